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

    python 02_score.py                            # all offline rewards, ~20 s for 20,000 images
    python 02_score.py --rewards alignment,sharpness --caption long

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
VERSION = 1


# ----------------------------------------------------------------------------- the detector
def as_float(images):
    """uint8 [B, H, W, 3] (array or memory map) -> float32 tensor in 0..255."""
    return torch.as_tensor(np.array(images)).float()


def median3x3(x):
    """Median over each pixel's 3x3 neighbourhood, edges replicated: (B, H, W) -> (B, H, W)."""
    patches = F.unfold(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), 3)  # (B, 9, H*W)
    return patches.median(1).values.view_as(x)


def detect(images, min_area_frac=12 / 1024, min_mix=0.5):
    """Read scenes back from images uint8 [B, H, W, 3]: per image a list of objects
    {"colour", "kind", "cx", "cy", "area"}.

    1. each pixel is explained as a mix of the image's background (the median of its
       border pixels) and one of the 6 colours: the colour whose background-to-colour
       line passes closest to the pixel wins, and the pixel is foreground if it is more
       than min_mix of the way along that line (anti-aliased edges, blur and fading are
       all such mixes);
    2. 4-connected pixels of one colour form a component (label propagation: each pixel
       takes the smallest index among its same-colour neighbours until nothing changes);
    3. components smaller than min_area_frac of the image are specks, not objects;
    4. the kind comes from the component's bounding box: a triangle pointing up has its
       centroid 2/3 of the way down the box (circles and squares 1/2), and a square fills
       its box (a circle fills pi/4 = 0.79 of it).
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
    image_of = torch.arange(B).view(B, 1, 1).expand(B, H, W)[foreground]
    keys, comp = torch.unique(image_of * none + label[foreground], return_inverse=True)
    n = len(keys)
    px, py = xs.expand(B, H, W)[foreground] + 0.5, ys.expand(B, H, W)[foreground] + 0.5  # pixel centres

    def per_component(values, how):
        return torch.zeros(n).scatter_reduce(0, comp, values, how, include_self=False)

    area = per_component(torch.ones_like(px), "sum")
    cx, cy = per_component(px, "sum") / area, per_component(py, "sum") / area
    left, right = per_component(px, "amin") - 0.5, per_component(px, "amax") + 0.5
    top, bottom = per_component(py, "amin") - 0.5, per_component(py, "amax") + 0.5
    fill = area / ((right - left) * (bottom - top))  # square 1, circle pi/4, triangle 1/2
    drop = (cy - top) / (bottom - top)  # centroid's depth in the box: triangle pointing up 2/3, others 1/2
    comp_colour = colour.reshape(-1)[keys]  # a component's label is the index of one of its pixels

    names = list(world.COLOURS)
    scenes = [[] for _ in range(B)]
    keep = (area >= min_area_frac * H * W).nonzero().flatten().tolist()
    for j in keep:
        kind = "triangle" if drop[j] > 0.585 else "square" if fill[j] > 0.93 else "circle"
        scenes[int(keys[j]) // none].append({"colour": names[comp_colour[j]], "kind": kind, "cx": float(cx[j]),
                                             "cy": float(cy[j]), "area": int(area[j]), "fill": float(fill[j]),
                                             "drop": float(drop[j])})
    return scenes


# ----------------------------------------------------------------------------- captions -> facts
_COLOUR = "|".join(world.COLOURS)
_KIND = "|".join(world.KINDS)
GROUP = re.compile(rf"\b(a|an|one|two|three|four) ({_COLOUR}) ({_KIND})s?\b")
RELATION = re.compile(rf"\bthe ({_COLOUR}) ({_KIND}) is (left of|right of|above|below) the ({_COLOUR}) ({_KIND})\b")
COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def parse_caption(text):
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
def alignment(images, captions):
    """Fraction of the caption's facts the detector confirms; NaN if the caption states none."""
    size = images.shape[1]
    scores = []
    for objects, caption in zip(detect(images), captions):
        groups, relation = parse_caption(caption)
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


# ----------------------------------------------------------------------------- the paper's reward models
# Each loader takes (source, device): source is a hub id or a local checkpoint path. It
# returns a function with the contract of REWARDS: (images uint8 [B, H, W, 3], captions)
# -> float32 [B]. Backbones may run in bf16 on CUDA; heads and scores are fp32.
def load_or_explain(name, source, load):
    """Call load(); if the weights cannot be found, stop with one line saying how to provide them."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "state_dict" in str(e):
            raise  # wrong keys in a checkpoint are a real error, not a missing download
        sys.exit(f"02_score.py: error: cannot load the weights of reward {name} from {source!r} "
                 f"({type(e).__name__}): download them where the hub is reachable and pass "
                 f"--checkpoint {name}=LOCAL_PATH")


# -- CLIP-family rewards: aesthetic, clip, pickscore, sciscore, hpsv2, jinaclip


# -- ImageReward: BLIP ViT-L and a BERT with cross-attention, then an MLP


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
    "vqascore": (load_vqascore, world.DEFAULT_CAPTIONER),
}


def score(reward, images, captions, batch_size, desc=None):
    """Run one reward over all images in batches: float32 [N], NaN where it failed.
    A batch that raises is retried image by image, so one bad image costs only itself."""
    out = torch.full((len(images),), float("nan"))
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch, text = np.asarray(images[start:start + batch_size]), captions[start:start + batch_size]
        try:
            out[start:start + len(batch)] = reward(batch, text)
        except Exception:
            for i in range(len(batch)):
                try:
                    out[start + i] = reward(batch[i:i + 1], text[i:i + 1])[0]
                except Exception:
                    pass
    out[~torch.isfinite(out)] = float("nan")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="working folder (reads images.npy, captions.pt)")
    parser.add_argument("--rewards", default=",".join(REWARDS), help=f"comma-separated, from: {', '.join(REWARDS)}")
    parser.add_argument("--caption", default="short", choices=["short", "long", "alt"], help="caption the rewards read")
    parser.add_argument("--batch-size", type=int, default=1024, help="images per reward call")
    args = parser.parse_args()
    stage = "02_score.py"
    names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    unknown = [name for name in names if name not in REWARDS]
    if unknown or not names:
        sys.exit(f"{stage}: error: unknown reward {', '.join(unknown) or '(none given)'}; known: {', '.join(REWARDS)}")
    if args.batch_size < 1:
        sys.exit(f"{stage}: error: --batch-size must be >= 1")
    world.prepare_out(args.out, stage)
    images = world.load_images(os.path.join(args.out, "images.npy"), stage)
    captions = world.load_pt(os.path.join(args.out, "captions.pt"), ["alt", "long", "short"], stage, "01_caption.py")
    if any(len(captions[k]) != len(images) for k in ("alt", "long", "short")):
        sys.exit(f"{stage}: error: images.npy has {len(images)} images but captions.pt has "
                 f"{len(captions['short'])} captions: re-run 01_caption.py")

    scores = torch.stack([score(REWARDS[name], images, captions[args.caption], args.batch_size, desc=name)
                          for name in names], 1)  # (N, R)
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


if __name__ == "__main__":
    main()
