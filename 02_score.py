"""Stage 02: score every image with R reward models.

MIRO's first step (paper eq. 1): for every training pair (x, c) and every reward model
r_i, compute the raw score s_i = r_i(x, c). Nothing is learned here; the scores are
binned by 03_bin.py and become the conditioning of the generator.

The registry REWARDS maps a name to a function (images uint8 [B, H, W, 3], captions
[B strings]) -> float32 [B], higher is better. The offline rewards of the shapes world:

    alignment      fraction of the caption's facts (counts of each colour+kind, the
                   relation, "nothing else") that the detector confirms in the image
    sharpness      how much of the image's contrast its steepest edges cross in one pixel
    low_noise      minus the mean residual after a 3x3 median filter (grey levels)
    colourfulness  Hasler & Suesstrunk (2003) colourfulness: vivid colours and clutter
                   raise it, so it can be "hacked" at the cost of alignment, like the
                   aesthetic score of the paper

    python 02_score.py                            # all offline rewards
    python 02_score.py --rewards alignment,sharpness --caption long

The registry MODEL_REWARDS holds the paper's reward models, loaded from their public
checkpoints or a local copy (--checkpoint NAME=PATH_OR_ID); fp32 weights take 4 bytes a
parameter, bf16 on CUDA 2:

    aesthetic  LAION improved aesthetic predictor on CLIP ViT-L/14   (0.43 B parameters)
    clip       CLIP score max(100 cos, 0), CLIP ViT-L/14              (0.43 B)
    pickscore  PickScore, CLIP ViT-H/14                               (0.99 B)
    sciscore   SciScore, CLIP ViT-H/14                                (0.99 B)
    hpsv2      HPSv2.1, open_clip ViT-H/14                            (0.99 B)
    imagereward  ImageReward: BLIP ViT-L + BERT with cross-attention  (0.45 B)
    vqascore   P("Yes") from a vision-language model, Qwen2.5-VL-3B    (3.75 B)
    jinaclip   the paper's jina-clip-v2: does not load under transformers 5, use clip

    python 02_score.py --rewards aesthetic,clip,pickscore,hpsv2,imagereward,sciscore,vqascore --device cuda
    python 02_score.py --rewards hpsv2 --checkpoint hpsv2=/data/HPS_v2.1_compressed.pt
    torchrun --nproc_per_node 8 02_score.py --rewards pickscore   # each GPU a share of the images

Reads OUT/images.npy and OUT/captions.pt; writes OUT/scores.pt (names, scores float32
[N, R] with NaN where a reward failed on an image, dataset: the captions' fingerprint,
version, config).
"""
import argparse
import importlib
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

world = importlib.import_module("01_caption")  # palette, kinds, file helpers
STAGE = "02_score.py"  # in every error line of this stage
VERSION = 2


# ----------------------------------------------------------------------------- the detector
def as_float(images):
    """uint8 [B, H, W, 3] (array, memory map or tensor) -> float32 tensor in 0..255 (a copy)."""
    if isinstance(images, torch.Tensor):
        return images.to(torch.float32, copy=True)
    return torch.as_tensor(np.array(images)).float()


def median3x3(x):
    """Median over each pixel's 3x3 neighbourhood, edges replicated: (B, H, W) -> (B, H, W)."""
    patches = F.unfold(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), 3)  # (B, 9, H*W)
    return patches.median(1).values.view_as(x)


def detect(images, min_area_frac=24 / 1024, min_mix=0.5):
    """Read scenes back from images uint8 [B, H, W, 3]: per image a list of objects
    {"colour", "kind", "cx", "cy", "area"}.

    1. each pixel is explained as a mix of the image's background (the median of its
       border pixels) and one of the 6 colours: the colour whose background-to-colour
       line passes closest to the pixel wins, and the pixel is foreground if it is more
       than min_mix of the way along that line (anti-aliased edges, blur and fading are
       all such mixes);
    2. 4-connected pixels of one colour form a component (label propagation: each pixel
       takes the smallest index among its same-colour neighbours until nothing changes);
    3. components smaller than min_area_frac of the image are not objects: like GenEval's
       confident detections, an object must cover at least half the area of the smallest
       object the world draws (a triangle of 0.6 of a cell, ~46 px at 32 px), so a stray
       patch of colour in a failed sample is not one (nearly every clutter speck is);
    4. the kind comes from the shape's moments, weighted by how much of each pixel it covers
       (its mix, over the component and the ring of pixels around it): the skewness of y,
       -0.57 for a triangle pointing up and 0 for circles and squares, then the four-fold
       part of the fourth cumulants, (k_xxxx + k_yyyy - 6 k_xxyy) / var^2, -2.4 for a square
       and 0 for a circle. Both are read the same at a shape's anti-aliased or blurred
       edges (a Gaussian blur adds nothing to third and fourth cumulants), where a bounding
       box is not.
    """
    x = as_float(images)  # (B, H, W, 3)
    B, H, W, _ = x.shape
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # (B, 2H+2W, 3)
    background = border.median(1).values[:, None, :]  # (B, 1, 3)
    palette = torch.tensor(list(world.COLOURS.values())).float()  # (C, 3)
    towards = palette[None] - background  # (B, C, 3): background -> colour
    offset = x.view(B, H * W, 3) - background  # (B, HW, 3)
    mix = (offset @ towards.transpose(1, 2) / (towards**2).sum(-1)[:, None]).clamp(0, 1)  # (B, HW, C)
    miss = (offset[:, :, None] - mix[..., None] * towards[:, None]).norm(dim=-1)  # (B, HW, C)
    best = miss.argmin(-1)  # (B, HW)
    foreground = (mix.gather(-1, best[..., None])[..., 0] > min_mix).view(B, H, W)
    colour = best.view(B, H, W)  # (B, H, W), meaningful where foreground

    none = H * W  # label larger than any pixel index
    label = torch.arange(H * W).view(1, H, W).expand(B, H, W).clone()
    label[~foreground] = none
    same_x = (colour[:, :, 1:] == colour[:, :, :-1]) & foreground[:, :, 1:] & foreground[:, :, :-1]  # (B, H, W-1)
    same_y = (colour[:, 1:] == colour[:, :-1]) & foreground[:, 1:] & foreground[:, :-1]  # (B, H-1, W)
    while True:
        new = label.clone()
        new[:, :, 1:] = torch.minimum(new[:, :, 1:], torch.where(same_x, label[:, :, :-1], none))
        new[:, :, :-1] = torch.minimum(new[:, :, :-1], torch.where(same_x, label[:, :, 1:], none))
        new[:, 1:] = torch.minimum(new[:, 1:], torch.where(same_y, label[:, :-1], none))
        new[:, :-1] = torch.minimum(new[:, :-1], torch.where(same_y, label[:, 1:], none))
        if torch.equal(new, label):
            break
        label = new

    # Per-component statistics, all images at once: key = image * (H*W) + label.
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    image_of = torch.arange(B).view(B, 1, 1).expand(B, H, W)
    keys, comp = torch.unique(image_of[foreground] * none + label[foreground], return_inverse=True)
    n = len(keys)
    px, py = xs.expand(B, H, W)[foreground] + 0.5, ys.expand(B, H, W)[foreground] + 0.5  # pixel centres

    def per_component(values, how="sum", index=comp):
        return torch.zeros(n, dtype=values.dtype).scatter_reduce(0, index, values, how, include_self=False)

    area = per_component(torch.ones_like(px))
    cx, cy = per_component(px) / area, per_component(py) / area
    # the soft shape: each component and the background pixels touching it, weighted by their mix
    # towards its colour (a ring pixel between two components goes to the one with the smaller label)
    grown = label.clone()
    padded = F.pad(label, (1, 1, 1, 1), value=none)
    for oy in (0, 1, 2):  # the 8 neighbours (and the pixel itself)
        for ox in (0, 1, 2):
            grown = torch.minimum(grown, torch.where(foreground, none, padded[:, oy:oy + H, ox:ox + W]))
    soft = grown < none
    index = torch.searchsorted(keys, image_of[soft] * none + grown[soft])
    weight = mix.view(B, H, W, -1)[soft].gather(1, colour.reshape(-1)[keys][index][:, None])[:, 0].double()
    qx, qy = xs.expand(B, H, W)[soft].double() + 0.5, ys.expand(B, H, W)[soft].double() + 0.5
    mean = lambda values: per_component(weight * values, index=index) / per_component(weight, index=index)
    dx, dy = qx - mean(qx)[index], qy - mean(qy)[index]
    vx, vy, vxy = mean(dx ** 2), mean(dy ** 2), mean(dx * dy)
    skew = mean(dy ** 3) / vy ** 1.5  # triangle pointing up -0.57, circle and square 0
    k_xxxx, k_yyyy = mean(dx ** 4) - 3 * vx ** 2, mean(dy ** 4) - 3 * vy ** 2  # fourth cumulants
    k_xxyy = mean(dx ** 2 * dy ** 2) - vx * vy - 2 * vxy ** 2
    four = (k_xxxx + k_yyyy - 6 * k_xxyy) / ((vx + vy) / 2) ** 2  # square -2.4, circle 0
    comp_colour = colour.reshape(-1)[keys]  # a component's label is the index of one of its pixels

    names = list(world.COLOURS)
    scenes = [[] for _ in range(B)]
    keep = (area >= min_area_frac * H * W).nonzero().flatten().tolist()
    for j in keep:
        kind = "triangle" if skew[j] < -0.28 else "square" if four[j] < -1.2 else "circle"
        scenes[int(keys[j]) // none].append({"colour": names[comp_colour[j]], "kind": kind, "cx": float(cx[j]),
                                             "cy": float(cy[j]), "area": int(area[j]), "skew": float(skew[j]),
                                             "four": float(four[j])})
    return scenes


# ----------------------------------------------------------------------------- captions -> facts
_COLOUR = "|".join(world.COLOURS)
_KIND = "|".join(world.KINDS)
GROUP = re.compile(rf"\b(a|an|one|two|three|four) ({_COLOUR}) ({_KIND})s?\b")
RELATION = re.compile(rf"\bthe ({_COLOUR}) ({_KIND}) is (left of|right of|above|below) the ({_COLOUR}) ({_KIND})\b")
COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def caption_facts(text):
    """Caption -> facts: ({(colour, kind): count}, relation or None). Works on the short
    and the long captions of the shapes world (repeated phrases add up)."""
    text = text.lower()
    groups = {}
    for number, colour, kind in GROUP.findall(RELATION.sub("", text)):
        groups[(colour, kind)] = groups.get((colour, kind), 0) + COUNT[number]
    match = RELATION.search(text)
    relation = None if match is None else ((match[1], match[2]), match[3], (match[4], match[5]))
    return groups, relation


def holds(a, word, b, size):
    """Is object a left of / right of / above / below object b? Centres, with a margin."""
    margin = size / 8
    return {"left of": a["cx"] < b["cx"] - margin, "right of": a["cx"] > b["cx"] + margin,
            "above": a["cy"] < b["cy"] - margin, "below": a["cy"] > b["cy"] + margin}[word]


def check_facts(objects, groups, relation, size):
    """List of booleans: each stated count, the relation, and that nothing unstated is there
    (which an empty image does not earn: it must show something)."""
    facts = [sum((o["colour"], o["kind"]) == key for o in objects) == count for key, count in groups.items()]
    if relation is not None:
        (ca, ka), word, (cb, kb) = relation
        facts.append(any(holds(a, word, b, size) for a in objects for b in objects
                         if (a["colour"], a["kind"]) == (ca, ka) and (b["colour"], b["kind"]) == (cb, kb)))
    facts.append(bool(objects) and all((o["colour"], o["kind"]) in groups for o in objects))
    return facts


# ----------------------------------------------------------------------------- rewards
def alignment(images, captions, scenes=None):
    """Fraction of the caption's facts the detector confirms; NaN if the caption states none.
    scenes: detect(images), where the caller has it already."""
    size = images.shape[1]
    scores = []
    for objects, caption in zip(detect(images) if scenes is None else scenes, captions):
        groups, relation = caption_facts(caption)
        facts = check_facts(objects, groups, relation, size) if groups else []
        scores.append(sum(facts) / len(facts) if facts else float("nan"))
    return torch.tensor(scores, dtype=torch.float32)


def luminance(images):
    return (as_float(images) * torch.tensor([0.299, 0.587, 0.114])).sum(-1)  # (B, H, W)


def sharpness(images, captions=None):
    """Mean of the steepest 1-pixel luminance steps over the image's luminance range. A crisp
    edge crosses the whole range in one pixel (about 1); blur spreads it (toward 0). The
    3x3 median first keeps noise from passing for detail."""
    lum = median3x3(luminance(images))
    steps = torch.cat([(lum[:, :, 1:] - lum[:, :, :-1]).abs().flatten(1),
                       (lum[:, 1:] - lum[:, :-1]).abs().flatten(1)], 1)  # (B, 2*H*(W-1))
    k = max(1, lum.shape[1] // 2)
    contrast = lum.flatten(1).amax(1) - lum.flatten(1).amin(1)
    return (steps.topk(k, 1).values.mean(1) / contrast.clamp(min=1.0)).float()  # in [0, 1]


def low_noise(images, captions=None):
    """Minus the mean absolute difference between the image and its 3x3 median, in grey
    levels: 0 for flat colour, about -0.71 sigma for grey noise of std sigma."""
    lum = luminance(images)
    return -(lum - median3x3(lum)).abs().mean((1, 2)).float()


def colourfulness(images, captions=None):
    """Hasler & Suesstrunk (2003): spread and mean of the opponent colours rg and yb."""
    r, g, b = as_float(images).unbind(-1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    mean = (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    return (spread + 0.3 * mean).float()


REWARDS = {"alignment": alignment, "sharpness": sharpness, "low_noise": low_noise, "colourfulness": colourfulness}


# ----------------------------------------------------------------------------- scoring a dataset
def score(reward, images, captions, batch_size, desc=None, progress=True, errors=None):
    """Run one reward over all images in batches: float32 [N], NaN where it failed (raised, or
    gave an infinite value). A batch that raises is retried image by image, so one bad image
    costs only itself. errors, a list, collects each distinct error's first message."""
    out = torch.full((len(images),), float("nan"))
    errors = [] if errors is None else errors

    def note(e):
        message = f"{type(e).__name__}: {e}"
        if message not in errors:
            errors.append(message)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        batch, text = np.asarray(images[start:start + batch_size]), captions[start:start + batch_size]
        try:
            out[start:start + len(batch)] = reward(batch, text)
        except Exception:
            for i in range(len(batch)):
                try:
                    out[start + i] = reward(batch[i:i + 1], text[i:i + 1])[0]
                except Exception as e:
                    note(e)
    if torch.isinf(out).any():
        errors.append(f"{int(torch.isinf(out).sum())} infinite value(s)")
    out[~torch.isfinite(out)] = float("nan")
    return out


def main():
    parser = world.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="working folder (reads images.npy, captions.pt)")
    parser.add_argument("--rewards", default=",".join(REWARDS),
                        help=f"comma-separated, offline: {', '.join(REWARDS)}; models: {', '.join(MODEL_REWARDS)} "
                             "(jinaclip does not load under transformers 5: use clip)")
    parser.add_argument("--caption", default="short", choices=["short", "long", "alt"], help="caption the rewards read")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH_OR_ID",
                        help="where a model reward's weights are (repeatable); defaults: "
                             + ", ".join(f"{name}={source}" for name, (_, source) in MODEL_REWARDS.items()))
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu: where model rewards run")
    parser.add_argument("--batch-size", type=world.count, help="images per reward call (default 1024 offline, 32 for models)")
    args = parser.parse_args()
    names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    unknown = [name for name in names if name not in REWARDS and name not in MODEL_REWARDS]
    if unknown or not names:
        sys.exit(f"{STAGE}: error: unknown reward {', '.join(unknown) or '(none given)'}; "
                 f"known: {', '.join([*REWARDS, *MODEL_REWARDS])}")
    sources = {name: source for name, (_, source) in MODEL_REWARDS.items()}
    for item in args.checkpoint:
        name, _, source = item.partition("=")
        if name not in MODEL_REWARDS or not source:
            sys.exit(f"{STAGE}: error: --checkpoint {item!r} is not NAME=PATH_OR_ID with NAME one of "
                     f"{', '.join(MODEL_REWARDS)}")
        sources[name] = source
    device = str(world.resolve_device(args.device, STAGE))
    world.prepare_out(args.out, STAGE)
    images = world.load_images(os.path.join(args.out, "images.npy"), STAGE)
    captions = world.load_pt(os.path.join(args.out, "captions.pt"), ["alt", "long", "short"], STAGE, "01_caption.py")
    world.check_pair(images, captions, STAGE)

    # Under torchrun each rank scores a contiguous share; rank 0 merges the shares and writes.
    rank, world_size = world.distributed(args.device)
    share = world.shard(len(images), rank, world_size)
    my_images, my_captions = images[share.start:share.stop], captions[args.caption][share.start:share.stop]
    columns = []
    for name in names:  # one model in memory at a time
        if name in REWARDS:
            reward, batch_size = REWARDS[name], args.batch_size or 1024
        else:
            loader, source = MODEL_REWARDS[name][0], sources[name]
            reward = load_reward_model(name, source, lambda: loader(source, device))
            batch_size = args.batch_size or 32
        errors = []
        columns.append(score(reward, my_images, my_captions, batch_size, desc=name, progress=rank == 0, errors=errors))
        del reward
        if len(my_images) and columns[-1].isnan().all():
            why = errors[0] if errors else "NaN for each"
            sys.exit(f"{STAGE}: error: reward {name} has no score on any image ({why}): nothing was written; "
                     f"check the images and captions (01_caption.py) or leave {name} out of --rewards")
        if errors and rank == 0:
            print(f"{name}: {int(columns[-1].isnan().sum())} image(s) without a score: {'; '.join(errors[:3])}")
    parts = world.merge_parts(torch.stack(columns, 1), os.path.join(args.out, "scores.pt"), rank, world_size)
    if rank:
        return
    scores = torch.cat(parts)  # (N, R)
    out = {"names": names, "scores": scores, "dataset": world.dataset_id(captions), "version": VERSION,
           "config": world.file_config(args)}
    world.save_atomic(out, os.path.join(args.out, "scores.pt"))

    print(f"scored {len(images)} images with {len(names)} rewards -> {args.out}/scores.pt")
    print(f"{'reward':>14} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} {'NaN':>6}")
    for name, column in zip(names, scores.T):
        ok = column[~column.isnan()]
        stats = [ok.mean(), ok.std(), ok.min(), ok.max()] if len(ok) else [float("nan")] * 4
        print(f"{name:>14} " + " ".join(f"{float(v):8.3f}" for v in stats) + f" {int(column.isnan().sum()):6d}")
    if scores.isnan().any():
        print(f"{int(scores.isnan().sum())} score(s) could not be computed and are NaN; 03_bin.py gives them the middle bin")



# ============================================================================= the paper's reward models
# The real-model path (--rewards aesthetic,clip,...): the shapes world above never needs it.
# Each loader takes (source, device): source is a hub id or a local checkpoint path. It
# returns a function with the contract of REWARDS: (images uint8 [B, H, W, 3], captions)
# -> float32 [B]. Backbones may run in bf16 on CUDA; heads and scores are fp32.
def load_reward_model(name, source, load):
    """load() a reward's model, or stop with one line saying how to provide its weights."""
    return world.load_or_explain(STAGE, f"reward {name}", source, load, f"pass --checkpoint {name}=LOCAL_PATH")


# -- CLIP-family rewards: aesthetic, clip, pickscore, sciscore, hpsv2, jinaclip
# All read captions through CLIP's 77-token window (start + 75 + end): longer captions are
# truncated, as in each model's published scoring code. Each model's own preprocessing
# resizes the images to 224 px (a 32 px shapes image is upsampled).
CLIP_L14 = "openai/clip-vit-large-patch14"  # the backbone of `aesthetic` and `clip`
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")


def backbone_dtype(device):
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_checkpoint(source):
    """A torch checkpoint from a local file, an https URL (cached by torch.hub) or 'org/repo/file' on the hub."""
    if source.startswith("https://"):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    if not os.path.exists(source):
        from huggingface_hub import hf_hub_download
        repo, _, filename = source.rpartition("/")
        source = hf_hub_download(repo, filename)
    return torch.load(source, map_location="cpu", weights_only=True)


def also_needs(what, model_id, load):
    """load() a second download a reward needs (a backbone, a processor), naming it if it is missing."""
    return world.load_or_explain(STAGE, what, model_id, load, "it is then read from the Hugging Face cache")


def hf_clip(source, processor_source, device):
    """A transformers CLIPModel, every weight from the checkpoint (strict) -> (exp(logit_scale),
    embed), embed(images uint8 [B, H, W, 3], captions or None) -> L2-normalised fp32 embeddings
    (image [B, D], text [B, D] or None)."""
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel
    dtype = backbone_dtype(device)
    model, info = CLIPModel.from_pretrained(source, output_loading_info=True)  # fp32
    bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise RuntimeError(f"state_dict of {source} does not fit CLIPModel: {bad}")
    scale = float(model.logit_scale.detach().exp())  # before the cast: from bf16, exp(4.6) is off by up to 1.6%
    model.to(device, dtype).eval()
    processor = also_needs("the processor", processor_source, lambda: AutoProcessor.from_pretrained(processor_source))

    @torch.no_grad()
    def embed(images, captions=None):
        pixels = processor(images=[Image.fromarray(array) for array in images], return_tensors="pt").pixel_values
        image = model.get_image_features(pixel_values=pixels.to(device, dtype)).pooler_output.float()
        if captions is None:
            return F.normalize(image, dim=-1), None
        tokens = processor(text=list(captions), padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(**tokens.to(device)).pooler_output.float()
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return scale, embed


def load_aesthetic(source, device, backbone=CLIP_L14):
    """LAION improved aesthetic predictor (sac+logos+ava1-l14-linearMSE): an MLP on the
    L2-normalised CLIP ViT-L/14 image embedding, 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with
    dropouts and no activations (so a linear map), trained on 1-10 ratings. Ignores the caption."""
    weights = load_checkpoint(source)  # first: a missing file is found before the backbone is loaded
    _, embed = also_needs("the CLIP backbone", backbone, lambda: hf_clip(backbone, backbone, device))
    head = torch.nn.ModuleDict({"layers": torch.nn.Sequential(  # keys layers.0/2/4/6/7, as published
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))})
    head.load_state_dict(weights)  # strict, fp32
    head.to(device).eval()

    @torch.no_grad()
    def aesthetic(images, captions=None):
        return head["layers"](embed(images)[0])[:, 0].cpu()
    return aesthetic


def load_clip(source, device):
    """CLIP score (Hessel et al. 2021, in torchmetrics' form): max(100 cos(image, caption), 0), CLIP ViT-L/14."""
    _, embed = hf_clip(source, source, device)

    def clip_score(images, captions):
        image, text = embed(images, captions)
        return (100 * (image * text).sum(-1)).clamp(min=0).cpu()
    return clip_score


def load_pickscore(source, device, processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """PickScore (Kirstain et al. 2023): CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences;
    score = exp(logit_scale) * cos(image, caption). Its processor is the base CLIP's."""
    scale, embed = hf_clip(source, processor, device)

    def preference(images, captions):
        image, text = embed(images, captions)
        return scale * (image * text).sum(-1).cpu()
    return preference


def load_sciscore(source, device):
    """SciScore (Li et al. 2025): PickScore's recipe on Science-T2I; its processor ships with it."""
    return load_pickscore(source, device, processor=source)


def load_hpsv2(source, device, arch="ViT-H-14"):
    """HPSv2.1 (Wu et al. 2023): open_clip ViT-H/14 fine-tuned on human preferences;
    score = cos(image, caption) (no logit scale). Images go through HPSv2's
    inference transform: the longest side fit to 224, then zero-padded to a square."""
    import logging
    import open_clip
    from PIL import Image
    dtype = backbone_dtype(device)
    weights = load_checkpoint(source)["state_dict"]  # published as {"state_dict": ...}
    logging.disable(logging.WARNING)  # open_clip warns that the model is random: its weights come next
    model, _, preprocess = open_clip.create_model_and_transforms(arch, image_resize_mode="longest")
    logging.disable(logging.NOTSET)
    model.load_state_dict(weights)  # strict
    model.to(device, dtype).eval()
    tokenizer = open_clip.get_tokenizer(arch)  # 77 tokens, longer captions truncated

    @torch.no_grad()
    def hps(images, captions):
        pixels = torch.stack([preprocess(Image.fromarray(array)) for array in images]).to(device, dtype)
        image = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(list(captions)).to(device)).float(), dim=-1)
        return (image * text).sum(-1).cpu()
    return hps


def load_jinaclip(source, device):
    """The paper's CLIP score, with jina-clip-v2 (its own text limit): 100 cos(image, caption).
    NOT VERIFIED: its remote code imports create_position_ids_from_input_ids, which transformers 5
    no longer has (it works up to 4.51), so here it stops with one line: use `clip` instead."""
    from PIL import Image
    from transformers import AutoModel, __version__
    try:
        model = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=backbone_dtype(device)).to(device).eval()
    except OSError:
        raise  # not downloaded: load_reward_model says how to provide it
    except Exception as e:  # its remote code fails to import or to build
        reason = (str(e) or type(e).__name__).splitlines()[0]
        sys.exit(f"{STAGE}: error: reward jinaclip does not load under transformers {__version__} "
                 f"({reason}): use --rewards clip instead")

    @torch.no_grad()
    def jina_score(images, captions):
        image = torch.as_tensor(model.encode_image([Image.fromarray(array) for array in images])).float()
        text = torch.as_tensor(model.encode_text(list(captions))).float()
        return 100 * F.cosine_similarity(image, text, dim=-1)
    return jina_score


# -- ImageReward: BLIP ViT-L and a BERT with cross-attention, then an MLP
# ImageReward (Xu et al. 2023, github.com/THUDM/ImageReward) is BLIP fine-tuned on human rankings:
#   image  -> BLIP's ViT-L/16 at 224 px                              -> tokens (B, 1 + 14*14, 1024)
#   prompt -> "[CLS] prompt [SEP]" padded to 35 tokens -> BLIP's BERT-base, whose 12 layers each
#             cross-attend to the image tokens                       -> (B, 35, 768)
#   the [CLS] position (B, 768) -> 5 linear layers with NO activation between them (the ReLUs are
#   commented out in the original) -> r (B,), reported as (r - mean) / std over their training set.
# Both towers are transformers' BLIP classes; only the ViT's parameter names differ from ImageReward.pt.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, as in ImageReward's _transform
IMAGEREWARD_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_TEXT_LENGTH = 35  # tokens, [CLS] and [SEP] included: longer prompts are cut
IMAGEREWARD_KEYS = [  # ImageReward.pt name (regular expression) -> name in imagereward_modules(), None = unused
    (r"blip\.visual_encoder\.cls_token", r"vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", r"vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.fc(1|2)\.(weight|bias)", r"vision.encoder.layers.\1.mlp.fc\2.\3"),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", r"vision.post_layernorm.\1"),
    (r"blip\.text_encoder\.embeddings\.position_ids", None),  # the buffer arange(512), not a weight
    (r"blip\.text_encoder\.(.+)", r"text.\1"),  # BLIP's med.py BertModel and BlipTextModel share these names
    (r"blip\.(vision|text)_proj\.(weight|bias)", None),  # BLIP's contrastive projections, not used for the reward
    (r"mlp\.layers\.(0|2|4|6|7)\.(weight|bias)", r"head.\1.\2"),
]


def imagereward_modules(vision, med):
    """The network, randomly initialised: "vision" (BLIP ViT), "text" (BERT with cross-attention),
    "head" (the MLP, its indices those of ImageReward's nn.Sequential). vision: width, depth, mlp
    width, patch and image size (ViT-L/16: 1024, 24, 4096, 16, 224); med: BLIP's med_config.json."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    vision_config = BlipVisionConfig(
        hidden_size=vision["width"], num_hidden_layers=vision["depth"], intermediate_size=vision["mlp"],
        num_attention_heads=vision["width"] // 64,  # BLIP's ViTs use 64-wide heads: ViT-L 16 heads, ViT-B 12
        patch_size=vision["patch"], image_size=vision["image_size"], hidden_act="gelu", layer_norm_eps=1e-6)
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
        max_position_embeddings=med["max_position_embeddings"], hidden_act=med["hidden_act"],
        layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        encoder_hidden_size=vision["width"],  # BLIP overrides med_config's encoder_width with the ViT's width
        is_decoder=True)  # only so that transformers builds the cross-attention; it is called as an encoder
    width = med["hidden_size"]
    head = torch.nn.Sequential(torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    return torch.nn.ModuleDict({"vision": BlipVisionModel(vision_config),
                                "text": BlipTextModel(text_config, add_pooling_layer=False), "head": head})


def rename_imagereward_keys(state):
    """ImageReward.pt's state dict -> imagereward_modules() names. An unknown key is an error."""
    renamed = {}
    for key, value in state.items():
        for pattern, target in IMAGEREWARD_KEYS:
            match = re.fullmatch(pattern, key)
            if match:
                if target is not None:
                    renamed[match.expand(target)] = value
                break
        else:
            raise RuntimeError(f"ImageReward.pt: unexpected key {key!r} in the state_dict")
    return renamed


def load_imagereward(source, device):
    """ImageReward from the hub repo THUDM/ImageReward (files ImageReward.pt and med_config.json;
    tokenizer: vocab.txt of bert-base-uncased), or from a local folder holding

        ImageReward.pt  med_config.json  vocab.txt (bert-base-uncased's; if absent, from the hub)

    or the path of such an ImageReward.pt. The ViT's size is read from the checkpoint's shapes.
    Returns fn(images uint8 [B, H, W, 3], captions) -> float32 [B], in standard deviations of
    ImageReward's own scores around their mean (0 = an average image for its prompt)."""
    import json
    from huggingface_hub import hf_hub_download
    from PIL import Image
    from torchvision import transforms
    from transformers import BertTokenizer

    def load():
        if os.path.exists(source):  # a local folder, or the path of the checkpoint inside it
            folder = source if os.path.isdir(source) else os.path.dirname(source)
            checkpoint = source if os.path.isfile(source) else os.path.join(folder, "ImageReward.pt")
            med_config, vocab = os.path.join(folder, "med_config.json"), os.path.join(folder, "vocab.txt")
        else:
            checkpoint, med_config = hf_hub_download(source, "ImageReward.pt"), hf_hub_download(source, "med_config.json")
            vocab = None
        if vocab is None or not os.path.isfile(vocab):
            vocab = hf_hub_download("bert-base-uncased", "vocab.txt")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        with open(med_config) as f:
            med = json.load(f)
        # BLIP's tokenizer: bert-base-uncased plus [DEC] and [ENC], the 2 extra words of vocab_size 30524.
        # ImageReward never uses them: its text starts with [CLS], not [ENC].
        tokenizer = BertTokenizer(vocab)
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        return state, med, tokenizer

    state, med, tokenizer = load_reward_model("imagereward", source, load)
    if len(tokenizer) != med["vocab_size"]:
        sys.exit(f"{STAGE}: error: imagereward: the tokenizer has {len(tokenizer)} words, "
                 f"med_config.json says {med['vocab_size']}: use bert-base-uncased's vocab.txt")
    renamed = rename_imagereward_keys(state)  # first, so that a foreign checkpoint fails with its key names
    blocks = {int(m[1]) for m in (re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k) for k in state) if m}
    patch_weight = state["blip.visual_encoder.patch_embed.proj.weight"]  # (width, 3, patch, patch)
    grid = int((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)  # (1, 1 + grid^2, width)
    vision = {"width": patch_weight.shape[0], "depth": len(blocks), "patch": patch_weight.shape[-1],
              "image_size": grid * patch_weight.shape[-1],
              "mlp": state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]}
    model = imagereward_modules(vision, med)
    model.load_state_dict(renamed, strict=True)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = model.to(device).eval()
    model["vision"].to(dtype)
    model["text"].to(dtype)  # the head stays in fp32

    size = vision["image_size"]
    preprocess = transforms.Compose([  # ImageReward's _transform(224), from PIL images as theirs
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
        transforms.ToTensor(), transforms.Normalize(IMAGEREWARD_PIXEL_MEAN, IMAGEREWARD_PIXEL_STD)])

    @torch.no_grad()
    def imagereward(images, captions):
        pixels = torch.stack([preprocess(Image.fromarray(np.asarray(image))) for image in images])  # (B, 3, S, S)
        text = tokenizer(list(captions), padding="max_length", truncation=True,
                         max_length=IMAGEREWARD_TEXT_LENGTH, return_tensors="pt")
        image_tokens = model["vision"](pixel_values=pixels.to(device, dtype)).last_hidden_state  # (B, 1+P, Dv)
        text_tokens = model["text"](input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device),
                                    encoder_hidden_states=image_tokens).last_hidden_state  # (B, 35, D)
        raw = model["head"](text_tokens[:, 0].float())[:, 0]  # (B,): the [CLS] position, in fp32
        return ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).cpu()

    return imagereward


# -- VQAScore: P("Yes") from a vision-language model
# VQAScore (Lin et al., 2024) asks a VLM 'Does this figure show "{caption}"? Please answer
# yes or no.' and scores the probability of the answer "Yes". The paper used VQAScore's
# CLIP-FlanT5-XXL (zhiqiulin/clip-flant5-xxl through the t2v_metrics package), an
# encoder-decoder that transformers cannot load; its score is exp(-mean cross-entropy) of
# the answer tokens "Yes" and "</s>", softmax over the whole vocabulary. For decoder-only
# VLMs (Qwen2-VL, Gemma 3, ...) t2v_metrics takes the softmax over the whole vocabulary of
# the first answer position and reads the first token of "Yes"; so does this loader, with
# the captioner of 01_caption.py (Qwen2.5-VL-3B by default; google/gemma-3-12b-it works too).
VQA_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
VQA_MIN_SIDE = 224  # smaller images (the 32 px shapes world) are upsampled so the VLM sees more than a few patches


def load_vqascore(source, device):
    """VQAScore from a transformers image-text-to-text model (not the paper's CLIP-FlanT5-XXL,
    which transformers cannot load): fn(images uint8 [B, H, W, 3], captions) -> float32 [B],
    P("Yes") in [0, 1], one forward pass per batch (left-padded, so every question ends at
    the last position, whose logits predict the first answer token)."""
    from PIL import Image
    device = torch.device(device)
    model, processor = world.load_vlm(source, device)
    yes = processor.tokenizer.encode("Yes", add_special_tokens=False)[0]

    @torch.no_grad()
    def vqascore(images, captions):
        pil = [Image.fromarray(np.asarray(image)) for image in images]
        scales = [max(1.0, VQA_MIN_SIDE / min(im.size)) for im in pil]
        pil = [im.resize((round(im.width * k), round(im.height * k)), Image.BICUBIC) for im, k in zip(pil, scales)]
        questions = [VQA_QUESTION.format(caption) for caption in captions]
        inputs = world.vlm_inputs(processor, pil, questions, model.device, model.dtype)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V): the first answer token
        return logits.softmax(-1)[:, yes].cpu()

    return vqascore


MODEL_REWARDS = {  # name -> (loader, default source)
    "aesthetic": (load_aesthetic, AESTHETIC_URL),
    "clip": (load_clip, CLIP_L14),
    "pickscore": (load_pickscore, "yuvalkirstain/PickScore_v1"),
    "hpsv2": (load_hpsv2, "xswu/HPSv2/HPS_v2.1_compressed.pt"),
    "imagereward": (load_imagereward, "THUDM/ImageReward"),
    "sciscore": (load_sciscore, "Jialuo21/SciScore"),
    "vqascore": (load_vqascore, world.DEFAULT_CAPTIONER),
    "jinaclip": (load_jinaclip, "jinaai/jina-clip-v2"),  # does not load under transformers 5: use clip
}


if __name__ == "__main__":
    main()
