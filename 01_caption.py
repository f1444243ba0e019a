"""Stage 01: build the dataset, images plus four captions per image.

MIRO trains on web images whose alt text is short and often wrong, recaptioned by a
vision-language model into a long and a short caption (paper appendix D).
This stage makes that dataset. By default it generates the built-in "shapes world":
1 to 4 flat shapes (3 kinds, 6 colours) on a 2x2 layout, each image with

    alt    like web alt text: often incomplete, sometimes wrong
    long   a complete, precise description (the "synthetic recaption")
    short  exactly the facts that the alignment reward of 02_score.py checks
    brief  states less, as short synthetic captions do: no relation, half the time no colour

and a spread of quality: four independent degradations (blur, luminance noise,
washed-out colour, confetti clutter) so that every reward of 02_score.py spans its
range. Captions never mention the degradations: only the rewards see them.
The world has two easier rungs (--world): `one` (one clean object an image) and `clean`
(1 to 4 objects, no degradation); a recipe is tried there first.

    python 01_caption.py                          # 20,000 scenes at 32 px
    python 01_caption.py --world one              # the first rung of the ladder
    python 01_caption.py --n 2000 --size 64 --out tiny
    python 01_caption.py --source folder --images DIR [--alt-file FILE]   # captions by Qwen2.5-VL-3B
    python 01_caption.py --source folder --images DIR --captioner google/gemma-3-12b-it  # the paper's
    torchrun --nproc_per_node 8 01_caption.py --source folder --images DIR  # each GPU captions 1/8

With --source folder, a vision-language model (transformers AutoModelForImageTextToText)
writes the long and the short caption of each image from the paper's two captioning
prompts (greedy, batched); an answer with no caption in it keeps the alt text, and the
count of those is printed and stored. --captioner none keeps the alt text for both.

Writes OUT/images.npy (uint8 [N, H, W, 3]), OUT/captions.pt (alt, long, short,
brief and world for the shapes world, meta, source, version, config; for a folder also
captioner and fallbacks) and OUT/world.png (the first 16 images under their short captions).
Same seed, same bytes.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

STAGE = "01_caption.py"  # in every error line of this stage
VERSION = 2

# ----------------------------------------------------------------------------- the world
# Flat colours, far apart in RGB so that a clean render is read back exactly, and equally colourful (02_score.py's
# colourfulness of one shape on the background): with unequal ones the top colourfulness bin is mostly the most
# colourful colours, and a model guided up on it paints the stated colours over with them.
COLOURS = {
    "red": (215, 40, 40), "green": (15, 185, 15), "blue": (30, 70, 240),
    "yellow": (232, 212, 35), "purple": (150, 20, 220), "orange": (240, 125, 30),
}
KINDS = ("circle", "square", "triangle")
BACKGROUND = (200, 200, 200)
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, col) of the 2x2 layout
CELL_NAMES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
NUMBERS = ("zero", "one", "two", "three", "four")
# Degradations: (probability of being applied, low, high) of the strength, at 32 px. Most images are washed out a
# little, as much of the web's are: the more of the data is poor, the more a model gains from knowing which is.
DEGRADATIONS = {
    "blur": (0.5, 0.4, 1.6),      # Gaussian sigma in pixels
    "noise": (0.5, 4.0, 40.0),    # std of grey (luminance) noise, in 0..255 units
    "washout": (0.7, 0.2, 0.75),  # fraction of saturation removed, faded toward light grey
    "clutter": (0.35, 3, 8),      # number of confetti specks in vivid colours
}
# A speck's side in pixels at 32 px: 25-42 px of area, so that 02_score.py's detector (which
# keeps components of 24 px and more) counts nearly every speck as an unstated object (one that
# straddles pixel edges can lose a row; tests/test_world.py asks for at least 90%).
SPECK_SIDE = (5.0, 6.5)


# The ladder of worlds (--world): a recipe is tried on the easiest world first.
#   one    one clean object per image: what to draw, from the words
#   clean  1 to 4 objects, no degradation: composition (kinds, counts, places)
#   full   1 to 4 objects and the degradations: what the rewards are for (the default)
WORLDS = {"one": dict(max_objects=1, degraded=False), "clean": dict(max_objects=4, degraded=False),
          "full": dict(max_objects=4, degraded=True)}


def sample_scene(rng, size, max_objects=4):
    """A random scene: 1 to max_objects objects in distinct cells of a 2x2 layout, with jitter and sizes."""
    n_objects = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(len(CELLS))[:n_objects]
    objects = []
    for i, cell_index in enumerate(cells):
        if i > 0 and rng.random() < 0.4:  # repeat an earlier colour+kind, so that counts > 1 occur
            earlier = objects[int(rng.integers(i))]
            colour, kind = earlier["colour"], earlier["kind"]
        else:
            colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(KINDS))
        objects.append(place(kind, colour, CELLS[cell_index], size, rng))
    return {"objects": objects, "relation": sample_relation(rng, objects)}


def place(kind, colour, cell, size, rng):
    """One object in a cell (row, col) of the 2x2 layout, 60-80% of the cell wide, jittered."""
    row, col = cell
    cell_px = size / 2
    diameter = float(rng.uniform(0.6, 0.8) * cell_px)
    slack = (cell_px - diameter) / 2 - size / 32  # keep a pixel of margin inside the cell
    cx = (col + 0.5) * cell_px + float(rng.uniform(-slack, slack))
    cy = (row + 0.5) * cell_px + float(rng.uniform(-slack, slack))
    return {"kind": kind, "colour": colour, "row": row, "col": col, "cx": cx, "cy": cy, "diameter": diameter}


def sample_relation(rng, objects):
    """Pick two objects that are each the only one of their colour+kind and say where one is."""
    key = lambda o: (o["colour"], o["kind"])
    singles = [o for o in objects if sum(key(p) == key(o) for p in objects) == 1]
    if len(singles) < 2:
        return None
    a, b = (singles[i] for i in rng.permutation(len(singles))[:2])
    axes = [axis for axis in ("col", "row") if a[axis] != b[axis]]
    axis = axes[int(rng.integers(len(axes)))]
    if axis == "col":
        word = "left of" if a["col"] < b["col"] else "right of"
    else:
        word = "above" if a["row"] < b["row"] else "below"
    return {"a": [a["colour"], a["kind"]], "word": word, "b": [b["colour"], b["kind"]]}


def render(scene, size, specks=(), supersample=4):
    """Draw a scene (and confetti specks over it), anti-aliased by drawing at 4x and
    averaging 4x4 blocks: uint8 [size, size, 3]."""
    big = size * supersample
    image = np.empty((big, big, 3), np.float32)
    image[:] = BACKGROUND
    for o in scene["objects"]:
        r = o["diameter"] / 2
        top, left = (max(0, int((c - r) * supersample)) for c in (o["cy"], o["cx"]))
        bottom, right = (min(big, int((c + r) * supersample) + 2) for c in (o["cy"], o["cx"]))
        y, x = (np.mgrid[top:bottom, left:right] + 0.5) / supersample  # sub-pixel centres
        dx, dy = x - o["cx"], y - o["cy"]
        if o["kind"] == "circle":
            mask = dx**2 + dy**2 <= r**2
        elif o["kind"] == "square":
            mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        else:  # triangle pointing up: the half-width grows linearly from apex to base
            mask = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
        image[top:bottom, left:right][mask] = COLOURS[o["colour"]]
    for x, y, side, colour in specks:
        image[int(y * supersample):int((y + side) * supersample), int(x * supersample):int((x + side) * supersample)] = COLOURS[colour]
    # the mean of each 4x4 block, summed one axis at a time (faster than .mean((1, 3)), and exact:
    # the colours are whole numbers)
    image = image.reshape(size, supersample, size, supersample, 3).sum(1).sum(2) / supersample**2
    return image.round().astype(np.uint8)


def sample_degradations(rng, size):
    """Independent degradations, each applied with its own probability; 0 means not applied.
    Clutter also gets its specks: (x, y, side, colour) at sub-pixel positions."""
    out = {}
    for name, (p, low, high) in DEGRADATIONS.items():
        applied = rng.random() < p
        if name == "clutter":
            out[name] = int(rng.integers(low, high + 1)) if applied else 0
        else:
            out[name] = float(rng.uniform(low, high)) if applied else 0.0
    out["specks"] = sample_specks(rng, out["clutter"], size)
    return out


def sample_specks(rng, n, size):
    """n confetti specks (x, y, side, colour), at sub-pixel positions anywhere in the image."""
    sides = rng.uniform(*SPECK_SIDE, n) * size / 32
    return [(float(rng.uniform(0, size - side)), float(rng.uniform(0, size - side)), float(side),
             str(rng.choice(list(COLOURS)))) for side in sides]


def degrade(images, degradations, rng):
    """Wash out, blur, then add grey noise, per image: uint8 [B, H, W, 3] -> uint8 [B, H, W, 3].
    (Clutter is drawn by render, with the scene.)"""
    B, H, W, _ = images.shape
    scale = H / 32
    x = torch.from_numpy(images).float()  # (B, H, W, 3), 0..255
    washout = torch.tensor([d["washout"] for d in degradations]).view(B, 1, 1, 1)
    grey = (x * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)  # luminance
    x = grey + (x - grey) * (1 - washout)  # desaturate
    x = x + (235 - x) * (washout / 2)  # and fade toward light grey
    sigma = torch.tensor([d["blur"] for d in degradations]) * scale  # (B,)
    radius = int(np.ceil(3 * DEGRADATIONS["blur"][2] * scale))
    taps = torch.arange(-radius, radius + 1).float()
    kernel = torch.exp(-taps**2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K); sigma 0 gives a delta
    planes = x.permute(0, 3, 1, 2).reshape(1, B * 3, H, W)
    k = kernel.repeat_interleave(3, 0)  # (B*3, K): one kernel per image and channel
    planes = F.conv2d(F.pad(planes, (radius,) * 4, mode="replicate"), k[:, None, :, None], groups=B * 3)
    planes = F.conv2d(planes, k[:, None, None, :], groups=B * 3)
    x = planes.reshape(B, 3, H, W).permute(0, 2, 3, 1)
    noise_std = torch.tensor([d["noise"] for d in degradations]).view(B, 1, 1, 1)
    x = x + noise_std * torch.from_numpy(rng.standard_normal((B, H, W, 1))).float()  # same on R, G, B
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- captions
def plural(kind, count):
    return kind + ("s" if count > 1 else "")


def counted(count, colour, kind):
    """'an orange circle', 'two red squares'; with colour None: 'a circle', 'two squares'."""
    words = f"{colour} {plural(kind, count)}" if colour else plural(kind, count)
    if count == 1:
        return ("an " if words[0] in "aeiou" else "a ") + words
    return f"{NUMBERS[count]} {words}"


def groups_of(scene):
    """Objects grouped by colour+kind, in order of first appearance: [(colour, kind, count)]."""
    counts = {}
    for o in scene["objects"]:
        counts[(o["colour"], o["kind"])] = counts.get((o["colour"], o["kind"]), 0) + 1
    return [(colour, kind, n) for (colour, kind), n in counts.items()]


def join(phrases):
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def relation_sentence(relation):
    (ca, ka), (cb, kb) = relation["a"], relation["b"]
    return f"the {ca} {ka} is {relation['word']} the {cb} {kb}."


def caption_short(scene):
    """What the alignment reward checks: every colour+kind with its count, and one relation."""
    text = join([counted(n, c, k) for c, k, n in groups_of(scene)]) + "."
    return text + (" " + relation_sentence(scene["relation"]) if scene["relation"] else "")


def caption_long(scene):
    """The complete description: each object with its place, then the relation."""
    objects = scene["objects"]
    where = [f"{counted(1, o['colour'], o['kind'])} at the {CELL_NAMES[(o['row'], o['col'])]}" for o in objects]
    count = "one shape" if len(objects) == 1 else f"{NUMBERS[len(objects)]} shapes"
    text = f"{count} on a plain grey background: {join(where)}."
    return text + (" " + relation_sentence(scene["relation"]).capitalize() if scene["relation"] else "")


def caption_brief(scene, rng):
    """A caption that states less, as short synthetic captions do: the objects and their counts,
    without the relation, and half the time without the colours ('a circle and two squares.')."""
    if rng.random() < 0.5:
        kinds = {}
        for o in scene["objects"]:
            kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
        return join([counted(n, None, k) for k, n in kinds.items()]) + "."
    return join([counted(n, c, k) for c, k, n in groups_of(scene)]) + "."


def caption_alt(scene, rng):
    """Web-like alt text: usually partial, sometimes wrong, sometimes useless."""
    o = scene["objects"][int(rng.integers(len(scene["objects"])))]
    u = rng.random()
    if u < 0.35:
        return f"{o['colour']} {o['kind']}"
    if u < 0.50:  # wrong colour
        return f"{rng.choice([c for c in COLOURS if c != o['colour']])} {o['kind']}"
    if u < 0.65:
        return join(sorted({plural(obj["kind"], 2) for obj in scene["objects"]}))
    if u < 0.80:
        return str(rng.choice(["geometric shapes", "abstract shapes clipart", "simple shapes on grey",
                               "stock image", "kids shapes poster"]))
    if u < 0.90:
        return f"img_{int(rng.integers(10000)):04d}.png"
    return join([f"{c} {plural(k, n)}" for c, k, n in groups_of(scene)])  # close, but no counts


NO_DEGRADATION = {"blur": 0.0, "noise": 0.0, "washout": 0.0, "clutter": 0, "specks": []}


def make_shapes(n, size, seed, world="full", progress=True):
    """n scenes of a world (WORLDS): images (uint8 [n, size, size, 3]) and the caption dict."""
    max_objects, degraded = WORLDS[world]["max_objects"], WORLDS[world]["degraded"]
    rng = np.random.default_rng(seed)
    brief_rng = np.random.default_rng([seed, 1])  # its own stream: the other captions and images stay as they were
    images = np.empty((n, size, size, 3), np.uint8)
    alt, long, short, brief, meta = [], [], [], [], []
    chunk = 2048
    for start in tqdm(range(0, n, chunk), desc=f"shapes world ({world})", unit="chunk", leave=False,
                      disable=not progress):
        stop = min(n, start + chunk)
        scenes = [sample_scene(rng, size, max_objects) for _ in range(stop - start)]
        if degraded:
            degradations = [sample_degradations(rng, size) for _ in scenes]
        else:
            degradations = [dict(NO_DEGRADATION) for _ in scenes]
        clean = np.stack([render(s, size, d["specks"]) for s, d in zip(scenes, degradations)])
        images[start:stop] = degrade(clean, degradations, rng) if degraded else clean
        for scene, d in zip(scenes, degradations):
            alt.append(caption_alt(scene, rng))
            long.append(caption_long(scene))
            short.append(caption_short(scene))
            brief.append(caption_brief(scene, brief_rng))
            meta.append({"scene": scene, "degradations": d})
    return images, {"alt": alt, "long": long, "short": short, "brief": brief, "meta": meta, "source": "shapes",
                    "world": world}


def world_of(captions):
    """The world a shapes dataset was drawn from ("full" for files written before there were others);
    None for a folder of images."""
    if captions.get("source") != "shapes":
        return None
    return captions.get("world", "full")


# ----------------------------------------------------------------------------- main
def main():
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="working folder for every STAGE's files")
    parser.add_argument("--source", default="shapes", choices=["shapes", "folder"], help="built-in shapes world or a folder")
    parser.add_argument("--n", type=count, default=20000, help="number of shapes-world scenes")
    parser.add_argument("--size", type=count, default=32, help="image side in pixels (32 default, 64 option)")
    parser.add_argument("--seed", type=natural, default=0, help="seed of the shapes world")
    parser.add_argument("--world", default="full", choices=list(WORLDS),
                        help="one: one clean object an image; clean: 1-4 objects, no degradation; full: the whole world")
    parser.add_argument("--images", help="folder of jpg/png/webp images (with --source folder)")
    parser.add_argument("--alt-file", help="alt text: JSON {file: text} or 'file<TAB>text' lines (else sidecar .txt)")
    parser.add_argument("--captioner", default=DEFAULT_CAPTIONER,
                        help="with --source folder: hub id or local folder of an image-text-to-text model, or none (keep the alt text)")
    parser.add_argument("--caption-size", type=count, default=448, help="side in pixels of the square the captioner sees")
    parser.add_argument("--caption-batch-size", type=count, default=8, help="images per generate call")
    parser.add_argument("--max-new-tokens", type=count, default=256, help="longest answer of the captioner, in tokens")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu: where the captioner runs")
    args = parser.parse_args()
    if args.source == "shapes" and (args.n < 1 or args.size < 16 or args.size % 16):
        sys.exit(f"{STAGE}: error: --n must be >= 1 and --size a multiple of 16 (got {args.n}, {args.size})")
    if args.source == "folder" and not args.images:
        sys.exit(f"{STAGE}: error: --source folder needs --images DIR")
    if min(args.caption_size, args.caption_batch_size, args.max_new_tokens) < 1:
        sys.exit(f"{STAGE}: error: --caption-size, --caption-batch-size and --max-new-tokens must be >= 1")
    captioning = args.source == "folder" and args.captioner != "none"
    if captioning and args.captioner.startswith(("/", "./", "../", "~")) and not os.path.isdir(
            os.path.expanduser(args.captioner)):
        sys.exit(f"{STAGE}: error: --captioner {args.captioner}: no such folder (a local model folder, or a hub id "
                 f"such as {DEFAULT_CAPTIONER})")
    device = resolve_device(args.device, STAGE) if captioning else None
    prepare_out(args.out, STAGE)

    rank, world_size = distributed(args.device) if captioning else (0, 1)
    if args.source == "shapes":
        images, captions = make_shapes(args.n, args.size, args.seed, args.world)
    else:
        images, captions = load_folder(args.images, args.size, args.alt_file, verbose=rank == 0)
        fallbacks = {"long": len(images), "short": len(images)}  # every caption is the alt text ...
        if captioning:  # ... unless a model writes them: each rank captions its share, rank 0 gathers
            model, processor = load_or_explain(
                STAGE, "the captioner", args.captioner, lambda: load_vlm(args.captioner, device),
                f"pass --captioner DIR (hf download {args.captioner} --local-dir DIR), or --captioner none")
            long, short, fallbacks = caption_folder(model, processor, args.images, captions, args.caption_size,
                                                    args.caption_batch_size, args.max_new_tokens, rank, world_size)
            parts = merge_parts({"long": long, "short": short, "fallbacks": fallbacks},
                                os.path.join(args.out, "captions.pt"), rank, world_size)
            if rank != 0:
                return
            captions["long"] = [c for part in parts for c in part["long"]]
            captions["short"] = [c for part in parts for c in part["short"]]
            fallbacks = {k: sum(part["fallbacks"][k] for part in parts) for k in ("long", "short")}
            print(f"captioned {len(images)} images with {args.captioner}: {fallbacks['long']} long and "
                  f"{fallbacks['short']} short answer(s) had no caption between <CAPTION> tags and keep the alt text")
        else:
            print("long and short captions keep the alt text (--captioner none)")
        captions.update(captioner=args.captioner if captioning else None, fallbacks=fallbacks)
    captions.update(images_id=images_id(images), version=VERSION, config=file_config(args))
    save_together({os.path.join(args.out, "images.npy"): images, os.path.join(args.out, "captions.pt"): captions})
    shown = min(16, len(images))  # a look at the data, each image under its short caption
    save_grid(images[:shown], captions["short"][:shown], os.path.join(args.out, "world.png"), columns=8)
    print(f"wrote {len(images)} images {images.shape[1]}x{images.shape[2]} to {args.out}/images.npy and captions.pt, "
          f"the first {shown} in world.png")
    for i in range(min(3, len(images))):
        print(f"  [{i}] alt: {captions['alt'][i]!r}\n      long: {captions['long'][i]!r}\n      short: {captions['short'][i]!r}"
              + (f"\n      brief: {captions['brief'][i]!r}" if "brief" in captions else ""))


# ============================================================================= the file contract every stage uses
# 02-07 import this stage as `world` for these helpers: flag
# types, checked loading and atomic saving of the stage files, devices, several GPUs.

# ----------------------------------------------------------------------------- command lines
# Every stage parses its flags with Parser and these types, so that a bad value stops the stage
# in one line ("05_train.py: error: argument --lr: ...") before any file is read or written.
class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: int or float, finite, within [low, high] (low excluded if low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low} (got {text})")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high} (got {text})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


count = number(int, 1)                        # how many of something: >= 1
natural = number(int, 0)                      # a step, seed or period where 0 means none: >= 0
fraction = number(float, 0.0, 1.0)            # a probability or a level: in [0, 1]
positive = number(float, 0.0, low_open=True)  # a rate or a size: > 0
non_negative = number(float, 0.0)             # a weight: >= 0
finite = number(float)                        # any finite number


# ----------------------------------------------------------------------------- files
def prepare_out(out, stage):
    """Make --out and check that it is writable, before any work is done."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = Path(out) / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        sys.exit(f"{stage}: error: cannot write to --out {out}: {e.strerror or e}")


def load_or_explain(stage, what, source, load, provide):
    """Call load(); if the model cannot be found (not downloaded, no hub), stop with one line
    naming it and saying how to provide it. Wrong weights in a checkpoint (an error that
    names the state_dict) are a real error and go through."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "state_dict" in str(e):
            raise
        sys.exit(f"{stage}: error: cannot load {what} {source!r} ({type(e).__name__}): download it where the "
                 f"hub is reachable and {provide}")


def file_config(args):
    """The flags that made a file, less --out: a file's content must not depend on its folder."""
    return {k: v for k, v in vars(args).items() if k != "out"}


def images_id(images):
    """A fingerprint of an image array: its shape and 64 rows spread over it (cheap on a memory-mapped
    file). captions.pt records the one of the images it was written with."""
    digest = hashlib.sha1(str(tuple(images.shape)).encode())
    for i in np.linspace(0, len(images) - 1, min(64, len(images))).astype(int):
        digest.update(np.ascontiguousarray(images[i]).tobytes())
    return digest.hexdigest()[:16]


def dataset_id(captions):
    """A fingerprint of a dataset (its captions and the images they were written with); 02 and 03
    carry it so that 05 can tell files of another dataset."""
    return hashlib.sha1(json.dumps([captions["alt"], captions["long"], captions.get("images_id")]).encode()).hexdigest()[:16]


def check_pair(images, captions, stage):
    """Stop with one line unless captions.pt was written with this images.npy (01 writes both at once)."""
    if any(len(captions[kind]) != len(images) for kind in ("alt", "long", "short")):
        sys.exit(f"{stage}: error: images.npy has {len(images)} images but captions.pt has "
                 f"{len(captions['alt'])} captions: re-run 01_caption.py")
    if "images_id" in captions and captions["images_id"] != images_id(images):
        sys.exit(f"{stage}: error: captions.pt was written with other images than images.npy (a run of "
                 f"01_caption.py stopped half way?): re-run 01_caption.py")


def save_atomic(obj, path):
    """torch.save (np.save for .npy, a str as UTF-8 text) to a temporary name, then rename: never a half file."""
    save_together({path: obj})


def save_together(files):
    """Write every {path: obj} to a temporary name first and rename them only when all are written,
    so that a failure leaves the earlier set whole and no temporary file behind."""
    written = {}
    try:
        for path, obj in files.items():
            written[path] = tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                if isinstance(obj, str):
                    f.write(obj.encode())
                elif str(path).endswith(".npy"):
                    np.save(f, obj)
                else:
                    torch.save(obj, f)
        for path, tmp in written.items():
            os.replace(tmp, path)
    finally:
        for tmp in written.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def process_alive(pid):
    """Is process pid running on this machine (a lock's owner, a staging folder's writer)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def load_pt(path, keys, stage, rerun):
    """Load a stage file with weights_only=True; stop with one line naming the stage to re-run."""
    if not os.path.exists(path):
        sys.exit(f"{stage}: error: {path} is missing: run {rerun} first")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:
        sys.exit(f"{stage}: error: {path} is unreadable ({type(e).__name__}): re-run {rerun}")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        sys.exit(f"{stage}: error: {path} lacks {', '.join(missing)}: re-run {rerun}")
    return data


def read_jsonl(path, stage):
    """The JSON objects of a .jsonl file, one a line. A line that is not one (a write cut short by a
    crash) is skipped with a warning, so that a run's log stays readable."""
    records, skipped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    if skipped:
        print(f"{stage}: warning: skipped {skipped} unreadable line(s) of {path} (a write cut short)", file=sys.stderr)
    return records


def load_images(path, stage):
    """images.npy, memory-mapped: uint8 [N, H, W, 3]."""
    if not os.path.exists(path):
        sys.exit(f"{stage}: error: {path} is missing: run 01_caption.py first")
    try:
        images = np.load(path, mmap_mode="r")
    except Exception as e:
        sys.exit(f"{stage}: error: {path} is unreadable ({type(e).__name__}): re-run 01_caption.py")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        sys.exit(f"{stage}: error: {path} is not uint8 [N, H, W, 3]: re-run 01_caption.py")
    return images


def to_signed(images, device="cpu"):
    """uint8 [N, H, W, 3] (numpy or torch) -> float [N, 3, H, W] in [-1, 1], the networks' scale
    (06_sample.to_uint8 goes back)."""
    return torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def save_grid(images, labels, path, columns, scale=4):
    """A PNG grid of uint8 images (N, H, W, 3), upscaled scale times so a person can read it, each
    with a short label under it (01's look at the data, 06's samples, 07's figures)."""
    images = torch.as_tensor(np.asarray(images))
    N, H, W, _ = images.shape
    rows = -(-N // columns)
    cell_w, cell_h = W * scale, H * scale + 12
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images.numpy(), labels)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        canvas.paste(Image.fromarray(image).resize((cell_w, H * scale), Image.NEAREST), (x, y))
        draw.text((x + 2, y + H * scale), label[: cell_w // 6], fill="black")
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def resolve_device(spec, stage):
    """--device auto (CUDA if there is one, else CPU), cpu, cuda or cuda:N -> torch.device; under
    torchrun, cuda is this process's GPU (LOCAL_RANK). Stops with one line for a device this
    machine does not have."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        sys.exit(f"{stage}: error: --device {spec!r} is not a device: use auto, cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"{stage}: error: --device {spec!r}: use auto, cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"{stage}: error: --device {spec} but no CUDA device is available: use --device cpu")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            sys.exit(f"{stage}: error: --device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


# ----------------------------------------------------------------------------- several GPUs
# Under torchrun, 01 (captioning) and 02 (scoring) split the images: each rank does a
# contiguous share and writes a part file, and rank 0 merges the parts in rank order; 05
# splits each batch (DDP). All three join the process group here.
def distributed(device="auto"):
    """(rank, world size), after joining torchrun's process group (NCCL on GPUs, gloo on CPUs);
    (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(n, rank, world_size):
    """This rank's contiguous share of n items, as a range (the shares cover 0..n-1 in order)."""
    per = -(-n // world_size)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def merge_parts(part, path, rank, world_size):
    """Every rank saves its part next to path; rank 0 returns the list of all parts in rank
    order and deletes them, the other ranks return None. Without torchrun: [part]."""
    if world_size == 1:
        return [part]
    import torch.distributed as dist
    part_path = f"{path}.part{rank}-of-{world_size}"
    save_atomic(part, part_path)
    dist.barrier()
    parts = None
    if rank == 0:
        paths = [f"{path}.part{r}-of-{world_size}" for r in range(world_size)]
        parts = [torch.load(p, weights_only=True) for p in paths]
    dist.barrier()  # every part is read before any is deleted
    if rank == 0:
        for p in paths:
            os.remove(p)
    return parts


# ============================================================================= real images
# Everything above makes the shapes world (the tutorial path, then main) and the files every stage
# shares. What follows is the path for a folder of real images (--source folder): reading them, and
# a vision-language model that writes their long and short captions.

# ----------------------------------------------------------------------------- a folder of images
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def read_alt_file(path):
    """Alt text per image: a JSON object {file name: text} or lines 'file name<TAB>text'. A file
    that is missing, not UTF-8 or not one of these stops with one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        sys.exit(f"{STAGE}: error: --alt-file {path}: no such file")
    except UnicodeDecodeError:
        sys.exit(f"{STAGE}: error: --alt-file {path} is not UTF-8 text")
    except OSError as e:
        sys.exit(f"{STAGE}: error: --alt-file {path}: {e.strerror or e}")
    if not path.endswith(".json"):
        return dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        sys.exit(f"{STAGE}: error: --alt-file {path} is not valid JSON ({e.msg} at line {e.lineno})")
    if not isinstance(table, dict):
        sys.exit(f"{STAGE}: error: --alt-file {path} holds a JSON {type(table).__name__}, not an object "
                 f"{{file name: alt text}}")
    return {str(k): str(v) for k, v in table.items()}


def read_square(path, size):
    """The centred square crop of an image file, resized to size: a PIL RGB image. 16-bit and
    float images are scaled to 8 bits (not clipped), transparency is laid over white."""
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            values = np.asarray(im, np.float64)
            top = 1.0 if im.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
            im = Image.fromarray((values.clip(0, top) * (255 / top)).round().astype(np.uint8), "L")
        elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, "white")
            im.alpha_composite(rgba)
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        return im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def load_folder(folder, size, alt_file=None, verbose=True):
    """Images under folder (recursive), centre-cropped and resized, with their alt text."""
    root = Path(folder)
    if not root.is_dir():
        sys.exit(f"{STAGE}: error: --images {folder} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    alt_of = read_alt_file(alt_file) if alt_file else {}
    images, alt, meta, skipped = [], [], [], 0
    for path in tqdm(paths, desc="reading images", unit="img", disable=not verbose):
        try:
            images.append(np.asarray(read_square(path, size), np.uint8))
        except Exception:
            skipped += 1
            continue
        name = str(path.relative_to(root))
        sidecar = path.with_suffix(".txt")
        text = alt_of.get(name, alt_of.get(path.name))
        if text is None and sidecar.exists():
            text = sidecar.read_text(encoding="utf-8", errors="replace")
        alt.append(" ".join((text or "").split()))
        meta.append({"file": name})
    if skipped and verbose:
        print(f"skipped {skipped} unreadable file(s) of {len(paths)}")
    missing = sum(not text for text in alt)
    if missing and verbose:
        print(f"{missing} of {len(alt)} image(s) have no alt text (no --alt-file entry, no sidecar .txt): "
              f"their alt caption is empty")
    if not images:
        sys.exit(f"{STAGE}: error: no readable jpg/png/webp image under {folder}")
    captions = {"alt": alt, "long": list(alt), "short": list(alt), "meta": meta, "source": "folder"}
    return np.stack(images), captions


# ----------------------------------------------------------------------------- captions from a vision-language model
# The paper recaptions its web images with Gemma 3 12B, asking each image for a long,
# detailed caption and a short one, answered between <CAPTION> tags (appendix D). The
# exact wording of its two prompts is not in the public code (nicolas-dufour/miro reads
# finished captions from a TSV: file, short, long), so the prompts below are ours, written
# to that description.
# Default: Qwen2.5-VL-3B (3.75B parameters, 7.5 GB of bf16 weights), a strong small captioner
# that t2v_metrics also lists as a VQAScore model. The paper's google/gemma-3-12b-it (12.2B,
# 24.4 GB) runs through the same code: --captioner google/gemma-3-12b-it.
DEFAULT_CAPTIONER = "Qwen/Qwen2.5-VL-3B-Instruct"
LONG_PROMPT = ("Describe this image in detail, as a caption for training a text-to-image model. Mention the "
               "main subjects and their attributes (colours, shapes, materials, counts), where they are and "
               "how they relate to each other, the background, the lighting, the style or medium, and any "
               "visible text. Write plain prose, without lists or a preamble. Put the caption between "
               "<CAPTION> and </CAPTION>.")
SHORT_PROMPT = ("Write a short caption for this image: one sentence of at most 25 words that names the main "
                "subjects, their key attributes and what they are doing. Put the caption between <CAPTION> "
                "and </CAPTION>.")


def load_vlm(source, device):
    """An image-text-to-text model and its processor from a hub id or a local folder, in
    eval mode on device: bf16 on CUDA, fp32 on CPU. The processor pads on the left, so that
    in a batch every prompt ends at the last position and generation continues from there.
    Raises OSError if the weights cannot be found; RuntimeError (naming the state_dict) if the
    checkpoint lacks weights of the architecture, which would otherwise stay random."""
    from transformers import AutoModelForImageTextToText, AutoProcessor  # only when a VLM is used
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(source)
    processor.tokenizer.padding_side = "left"
    model, info = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        raise RuntimeError(f"{source}: state_dict lacks {sorted(info['missing_keys'])[:5]} "
                           f"({len(info['missing_keys'])} keys missing)")
    return model.to(device).eval(), processor


def vlm_inputs(processor, images, prompts, device, dtype):
    """One user turn per image (the image, then its prompt) through the model's own chat
    template, tokenized and batched with left padding: input_ids (B, L), attention_mask (B, L)
    and the model's pixel tensors (cast to dtype), on device."""
    turns = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
             for image, prompt in zip(images, prompts)]
    inputs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    return inputs.to(device, dtype=dtype)  # dtype applies to the floating tensors only (pixels)


@torch.no_grad()
def vlm_answers(model, processor, images, prompt, max_new_tokens):
    """Greedy answers of the model to one prompt about each image: list of B strings."""
    inputs = vlm_inputs(processor, images, [prompt] * len(images), model.device, model.dtype)
    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)  # (B, L + new)
    return processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


OPEN_TAG, CLOSE_TAG = re.compile(r"<\s*caption\s*>", re.I), re.compile(r"<\s*/\s*caption\s*>", re.I)


def caption_from_answer(answer):
    """The caption between <CAPTION> and </CAPTION> in a model's answer, whitespace collapsed;
    None if there is none. Of several tagged captions the first non-empty one wins; a last
    tag left open (the answer ran out of tokens) still counts, and so does the text before a
    closing tag whose opening tag is missing. An answer with no tag at all is not trusted to
    be a caption (it is usually a preamble or a refusal)."""
    opened = OPEN_TAG.split(answer)
    if len(opened) > 1:  # the text after each opening tag
        candidates = opened[1:]
    elif CLOSE_TAG.search(answer):  # only a closing tag: the text before it
        candidates = CLOSE_TAG.split(answer)[:1]
    else:
        candidates = []
    for candidate in candidates:
        text = " ".join(CLOSE_TAG.split(candidate)[0].split())
        if text:
            return text
    return None


def caption_folder(model, processor, root, captions, size, batch_size, max_new_tokens, rank=0, world_size=1):
    """Long and short captions of this rank's contiguous share of the images, read again from
    their files as the same centred square at size px (the stored images may be as small as
    32 px). Returns (long, short, fallbacks) for the share; an answer with no caption keeps
    the alt text and counts in fallbacks {"long": n, "short": n}."""
    mine = shard(len(captions["alt"]), rank, world_size)
    long, short, fallbacks = [], [], {"long": 0, "short": 0}
    bar = tqdm(total=len(mine), desc="captioning", unit="img", disable=rank != 0)
    for start in range(mine.start, mine.stop, batch_size):
        batch = range(start, min(start + batch_size, mine.stop))
        images = [read_square(Path(root) / captions["meta"][i]["file"], size) for i in batch]
        for kind, prompt, out in (("long", LONG_PROMPT, long), ("short", SHORT_PROMPT, short)):
            for i, answer in zip(batch, vlm_answers(model, processor, images, prompt, max_new_tokens)):
                caption = caption_from_answer(answer)
                fallbacks[kind] += caption is None
                out.append(captions["alt"][i] if caption is None else caption)
        bar.update(len(batch))
    bar.close()
    return long, short, fallbacks


if __name__ == "__main__":
    main()
