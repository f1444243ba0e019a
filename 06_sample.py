"""Stage 06: sample images with the multi-reward classifier-free guidance of paper eq. 3.

The trained network predicts the velocity v = eps - x of the straight path
x_t = (1 - t) x + t eps (05_train.py). Sampling integrates dx/dt = v from pure noise at
t = 1 down to data at t = 0, here with Euler steps (Heun as an option). At every step
the network is asked twice, in one batched forward:

    v = v(x_t, c, s+) + w * (v(x_t, c, s+) - v(x_t, c-, s-))       (paper eq. 3)

s+ and s- are the positive and negative reward targets, one level in [0, 1] per reward
(level = bin / (B - 1), 03_bin.py): by default s+ = 1 (the top bin of every reward) and
s- = 0, so the guidance pushes away from low-reward images and toward high-reward ones.
c- is the empty caption by default, as in the released MIRO pipeline (its negative branch
is the unconditional text embedding with the low targets): the guidance then pushes
towards the caption too. --neg-text keep puts the caption in both branches (c- = c, eq. 3
as the paper writes it), so that it guides along the rewards alone. w = 0 gives the plain
conditional velocity v(x_t, c, s+). A run with no rewards (the baseline) is guided by its
text alone.

Modes (one at a time):
    all rewards     s+ and s- as given (default)
    --isolate j     s- = s+ except s-_j = 0: guide along reward j alone (paper Fig. 9)
    --interpolate a,b   a row per alpha in [0, 1]: s+_a = alpha, s+_b = 1 - alpha,
                    trading one reward against the other at inference
    --best-of N --select r   draw N candidates per prompt, keep the one reward r scores
                    highest (test-time scaling, paper Fig. 8)

    python 06_sample.py --run miro                        # 16 held-out captions, w = 1
    python 06_sample.py --run miro --pos colourfulness=0.5 --cfg 5
    python 06_sample.py --run miro --isolate sharpness --prompts prompts.txt
    python 06_sample.py --run miro --best-of 8 --select alignment

Reads OUT/runs/NAME/ckpt.pt (EMA weights by default), OUT/bins.pt, OUT/captions.pt for
held-out prompts; writes OUT/runs/NAME/samples.pt (images uint8 [N, H, W, 3], prompts,
s_plus, s_minus [N, R], cfg, steps, seed) and OUT/runs/NAME/samples.png, a labelled grid.
"""
import argparse
import dataclasses
import importlib
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

world = importlib.import_module("01_caption")  # file helpers
rewards = importlib.import_module("02_score")  # reward functions, for --best-of
net = importlib.import_module("04_model")
STAGE, VERSION = "06_sample.py", 1


# ----------------------------------------------------------------------------- the run
def load_run(out, run, use_ema=True, device="cpu", stage=STAGE):
    """The network of a run (EMA weights unless use_ema is False, in eval mode) and its checkpoint.
    stage names the stage that reads it in error lines (07_eval.py reads runs too)."""
    path = os.path.join(out, "runs", run, "ckpt.pt")
    ckpt = world.load_pt(path, ["model", "ema", "model_args", "reward_names", "step"], stage, "05_train.py")
    bins_path = os.path.join(out, "bins.pt")
    if ckpt["reward_names"] and os.path.exists(bins_path):
        names = list(world.load_pt(bins_path, ["names"], stage, "03_bin.py")["names"])
        missing = [name for name in ckpt["reward_names"] if name not in names]
        if missing:
            sys.exit(f"{stage}: error: run {run} was trained on rewards {', '.join(missing)} that bins.pt does not "
                     f"have ({', '.join(names)}): re-run 05_train.py on this bins.pt")
    model = net.rebuild(ckpt["model_args"], ckpt["ema" if use_ema else "model"], path, stage)
    model = model.to(device).eval().requires_grad_(False)
    return model, ckpt


def parse_targets(spec, names, default):
    """'--pos 1,0.5,1,1' (reward order) or '--pos alignment=1,sharpness=0.5' (the rest keep default)
    -> list of R levels in [0, 1]."""
    levels = [float(default)] * len(names)
    if spec is None or spec == "":
        return levels
    items = spec.split(",")
    try:
        if all("=" in item for item in items):
            for item in items:
                name, value = item.split("=")
                if name.strip() not in names:
                    sys.exit(f"{STAGE}: error: unknown reward {name.strip()!r}; this run has: {', '.join(names) or 'none'}")
                levels[names.index(name.strip())] = float(value)
        elif len(items) == len(names):
            levels = [float(item) for item in items]
        else:
            sys.exit(f"{STAGE}: error: {spec!r} gives {len(items)} levels but the run has {len(names)} rewards "
                     f"({', '.join(names) or 'none'}); or write name=level")
    except ValueError:
        sys.exit(f"{STAGE}: error: cannot read reward targets {spec!r}: write levels like 1,0.5 or name=0.5")
    bad = [level for level in levels if not 0 <= level <= 1]
    if bad:
        sys.exit(f"{STAGE}: error: reward level {bad[0]} is outside [0, 1] in {spec!r}")
    return levels


# ----------------------------------------------------------------------------- guidance (eq. 3)
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a batch is sampled, besides its prompts, targets and seed.

    cfg        the guidance weight w of eq. 3 (0: the plain conditional velocity)
    steps      integration steps from t = 1 to 0, method "euler" or "heun"
    neg_text   the negative branch's caption: "drop" (the empty caption, as the released pipeline) or "keep"
    cfg_max_t  guide only at t <= this (1: every step)
    t_scale    the network is told t * t_scale (<= 1). A network whose clean-image estimate keeps less
               of an object than x_t already shows fades it a little at every step (07's contrast probe),
               and an object that the caption leaves open (no colour) can fade away before it is drawn.
               Told a smaller t, the network takes x_t as less noisy and keeps more of it; the velocity
               is rebuilt from its estimate with the true t. Sampling at a shifted time step is a known
               answer to this mismatch between training and sampling (exposure bias: Li et al. 2024).
    """
    cfg: float = 1.0
    steps: int = 50
    method: str = "euler"
    neg_text: str = "drop"
    cfg_max_t: float = 1.0
    t_scale: float = 1.0


def add_sampling_args(parser, steps=50, method="euler"):
    """The options of a Sampling, shared by this stage and 07 (which samples with other defaults)."""
    parser.add_argument("--cfg", type=world.finite, default=1.0, help="guidance weight w of eq. 3 (0: no guidance)")
    parser.add_argument("--cfg-max-t", type=world.fraction, default=1.0,
                        help="guide only at t <= this (1: every step; lower leaves the noisiest steps unguided)")
    parser.add_argument("--neg-text", default="drop", choices=["drop", "keep"],
                        help="negative branch: the empty caption (text guidance too, as the released MIRO "
                             "pipeline) or the caption (the rewards alone)")
    parser.add_argument("--t-scale", type=world.number(float, 0.0, 1.0, low_open=True), default=1.0,
                        help="the network is told t times this (< 1: it keeps more of what x_t shows; see Sampling)")
    parser.add_argument("--steps", type=world.count, default=steps, help="integration steps from t = 1 to 0")
    parser.add_argument("--method", default=method, choices=["euler", "heun"],
                        help="euler, or heun: second order, two evaluations a step (the last step is Euler)")


def sampling_of(args):
    """The Sampling that add_sampling_args' options describe."""
    return Sampling(args.cfg, args.steps, args.method, args.neg_text, args.cfg_max_t, args.t_scale)


class Guided:
    """The guided velocity field of one batch: text and targets are fixed, x_t and t move.

    Both branches go through the network in one forward of 2B rows: (c, s+) then (c-, s-),
    where c- is the empty caption (neg_text="drop", and always for a run without rewards) or the
    caption (neg_text="keep"). Each branch keeps its own self-conditioning latents (or clean-image
    estimate) from the previous call, as in training, where the network sees its own earlier guess.
    With t_scale < 1 the network is told t * t_scale (Sampling).
    """

    def __init__(self, model, ids, s_plus, s_minus, cfg, neg_text, cfg_max_t=1.0, t_scale=1.0):
        B = len(ids)
        drop = neg_text == "drop" or model.num_rewards == 0
        neg_ids = net.tokenize([""], ids.shape[1], model.text_encoder).to(ids.device).expand(B, -1) if drop else ids
        self.model, self.cfg, self.guided, self.cfg_max_t, self.t_scale = model, cfg, cfg != 0, cfg_max_t, t_scale
        ids2 = torch.cat([ids, neg_ids]) if self.guided else ids
        self.tokens, self.mask = model.encode_text(ids2)  # text is encoded once for all steps
        self.levels = torch.cat([s_plus, s_minus]) if self.guided else s_plus  # (2B or B, R)
        self.latents = self.image = None

    def __call__(self, x, t):
        """x (B, 3, H, W), t float -> guided v (B, 3, H, W)."""
        x2 = torch.cat([x, x]) if self.guided else x
        told = t * self.t_scale
        t2 = torch.full((len(x2),), float(told), device=x.device)
        v, self.latents = self.model.denoise(x2, t2, self.levels, self.tokens, self.mask, self.latents, self.image)
        v = v.to(torch.promote_types(v.dtype, torch.float32))  # bf16 under autocast: guide in float32
        if self.model.self_cond == "image" or self.t_scale != 1:
            x_hat = self.model.estimate(x2, v, t2)  # the clean-image estimate behind v
            if self.model.self_cond == "image":
                self.image = x_hat
            if self.t_scale != 1:  # the velocity towards the same estimate from x_t at the true t
                v = net.velocity_from_image(x2, x_hat, torch.full_like(t2, t))
        if not self.guided:
            return v
        v_pos, v_neg = v.chunk(2)
        w = self.cfg if t <= self.cfg_max_t else 0.0  # cfg_max_t < 1: no guidance at the noisiest steps
        return v_pos + w * (v_pos - v_neg)


def integrate(velocity, noise, steps, method="euler"):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 (data) on a uniform grid.

    Euler: x <- x - dt v(x, t). Heun: an Euler guess, then the average of the slopes at both
    ends (second order, two evaluations a step; the last step to t = 0 is plain Euler)."""
    x = noise.float()
    ts = torch.linspace(1, 0, steps + 1).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t - t_next
        v = velocity(x, t)
        if method == "heun" and t_next > 0:
            guess = x - dt * v
            v = (v + velocity(guess, t_next)) / 2
        x = x - dt * v
    return x


@torch.no_grad()
def sample(model, ids, s_plus, s_minus, noise, how, autocast=None):
    """Images in [-1, 1] (B, 3, H, W) for token ids (B, L), targets s+/s- (B, R) and Sampling how."""
    with autocast or torch.autocast(noise.device.type, enabled=False):
        guided = Guided(model, ids, s_plus, s_minus, how.cfg, how.neg_text, how.cfg_max_t, how.t_scale)
        return integrate(guided, noise, how.steps, how.method).clamp(-1, 1)


def to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def generate(model, prompts, s_plus, s_minus, seed, how=Sampling(), batch_size=64, device="cpu", progress=False):
    """uint8 images (N, H, W, 3) for N prompts and targets (N, R), sampled as Sampling how says; image
    i's noise comes from (seed, i) alone, so an image does not depend on the batch it was drawn in."""
    size, R = model.image_size, model.num_rewards
    ids = net.tokenize(prompts, model.text_len, model.text_encoder)
    s_plus, s_minus = (torch.as_tensor(s, dtype=torch.float32).reshape(len(prompts), R) for s in (s_plus, s_minus))
    noise = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(len(prompts))])
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch", disable=not progress):
        sl = slice(start, start + batch_size)
        x = sample(model, ids[sl].to(device), s_plus[sl].to(device), s_minus[sl].to(device), noise[sl].to(device), how)
        out.append(to_uint8(x))
    return torch.cat(out)


def best_of(candidates, scores):
    """candidates (N, K, H, W, 3), scores (N, K) -> the best candidate per row (N, H, W, 3), its index."""
    best = scores.nan_to_num(float("-inf")).argmax(1)
    return candidates[torch.arange(len(candidates)), best], best


# ----------------------------------------------------------------------------- prompts and the grid
HELD_OUT_SEED = 999_999  # scenes drawn with this seed are not in the training set (01 uses seed 0)


def fresh_captions(n, kind="short", world_name="full"):
    """Captions of n scenes of a shapes world that the model never saw (the fixed evaluation set)."""
    return world.make_shapes(n, 32, HELD_OUT_SEED, world_name, progress=False)[1][kind]


def held_out_prompts(out, n, kind="short"):
    """Fresh captions of the dataset's shapes world, or for a folder dataset its last n captions
    (05 trains on all of them, so those are only a fixed set)."""
    captions = world.load_pt(os.path.join(out, "captions.pt"), [kind, "source"], STAGE, "01_caption.py")
    if captions["source"] == "shapes":
        return fresh_captions(n, kind, world.world_of(captions))
    return list(captions[kind][-n:])


def read_prompts(path):
    if not os.path.exists(path):
        sys.exit(f"{STAGE}: error: --prompts {path}: no such file")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        sys.exit(f"{STAGE}: error: --prompts {path} holds no prompt (one prompt a line)")
    return prompts


# ----------------------------------------------------------------------------- main
def targets_for(args, names):
    """Per mode: a list of (label, s+, s-) rows, each applied to every prompt."""
    s_plus, s_minus = parse_targets(args.pos, names, 1.0), parse_targets(args.neg, names, 0.0)
    for option in (args.isolate, *(args.interpolate or "").split(",")):
        if option and option not in names:
            sys.exit(f"{STAGE}: error: unknown reward {option!r}; this run has: {', '.join(names) or 'none'}")
    if args.isolate:
        j = names.index(args.isolate)
        return [(f"{args.isolate} only", s_plus, [*s_plus[:j], 0.0, *s_plus[j + 1:]])]
    if args.interpolate:
        a, b = (names.index(name) for name in args.interpolate.split(","))
        rows = []
        for alpha in np.linspace(0, 1, args.alphas):
            row = list(s_plus)
            row[a], row[b] = float(alpha), float(1 - alpha)
            rows.append((f"{names[a]}={alpha:.2f}", row, s_minus))
        return rows
    return [("", s_plus, s_minus)]


def main():
    parser = world.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--run", "--run-name", dest="run", default="miro")
    parser.add_argument("--prompts", help="a text file, one prompt a line (default: held-out captions)")
    parser.add_argument("--n", type=world.count, default=16, help="number of held-out captions when --prompts is not given")
    parser.add_argument("--caption-kind", default="short", choices=["alt", "long", "short", "brief"])
    parser.add_argument("--pos", help="s+: levels in reward order (1,0.5,...) or name=level,...; default all 1")
    parser.add_argument("--neg", help="s-: as --pos; default all 0")
    add_sampling_args(parser)
    parser.add_argument("--isolate", metavar="REWARD", help="guide along this reward alone (s- = s+ but 0 there)")
    parser.add_argument("--interpolate", metavar="A,B", help="trade reward A against B over --alphas rows")
    parser.add_argument("--alphas", type=world.number(int, 2), default=5)
    parser.add_argument("--best-of", type=world.count, default=1, metavar="N", help="candidates per prompt")
    parser.add_argument("--select", metavar="REWARD", help="the reward that picks the best of N")
    parser.add_argument("--seed", type=world.natural, default=0)
    parser.add_argument("--batch-size", type=world.count, default=64)
    parser.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = world.resolve_device(args.device, STAGE)
    if args.interpolate is not None and len(set(args.interpolate.split(","))) != 2:
        sys.exit(f"{STAGE}: error: --interpolate {args.interpolate!r}: name two different rewards, A,B")
    if args.best_of > 1 and args.select not in rewards.REWARDS:
        sys.exit(f"{STAGE}: error: --best-of needs --select, one of: {', '.join(rewards.REWARDS)}")

    model, ckpt = load_run(args.out, args.run, not args.raw, device)
    names = ckpt["reward_names"]
    rows = targets_for(args, names)
    prompts = read_prompts(args.prompts) if args.prompts else held_out_prompts(args.out, args.n, args.caption_kind)
    all_prompts, s_plus, s_minus, labels = [], [], [], []
    for label, pos, neg in rows:
        all_prompts += prompts
        s_plus += [pos] * len(prompts)
        s_minus += [neg] * len(prompts)
        labels += [label or prompt for prompt in prompts]
    K = args.best_of
    how = sampling_of(args)
    print(f"run {args.run} (step {ckpt['step']}): {len(all_prompts)} images x {K} candidates, rewards "
          f"{names or 'none (text guidance)'}, s+ {rows[0][1]}, s- {rows[0][2]}, w {args.cfg}, {args.steps} "
          f"{args.method} steps")
    candidates = generate(model, [p for p in all_prompts for _ in range(K)], [s for s in s_plus for _ in range(K)],
                          [s for s in s_minus for _ in range(K)], args.seed, how, args.batch_size, device, progress=True)
    images = candidates
    if K > 1:
        scores = rewards.REWARDS[args.select](candidates, [p for p in all_prompts for _ in range(K)]).view(-1, K)
        images, _ = best_of(candidates.view(len(all_prompts), K, *candidates.shape[1:]), scores)
        print(f"best of {K} by {args.select}: mean {scores.max(1).values.nanmean():.3f} "
              f"(one candidate: {scores[:, 0].nanmean():.3f})")

    run_dir = os.path.join(args.out, "runs", args.run)
    shape = (len(all_prompts), len(names))
    world.save_atomic({"images": images, "prompts": all_prompts, "s_plus": torch.tensor(s_plus).reshape(shape),
                       "s_minus": torch.tensor(s_minus).reshape(shape), "cfg": args.cfg, "cfg_max_t": args.cfg_max_t,
                       "t_scale": args.t_scale, "steps": args.steps, "seed": args.seed, "version": VERSION,
                       "config": world.file_config(args)},
                      os.path.join(run_dir, "samples.pt"))
    world.save_grid(images, labels, os.path.join(run_dir, "samples.png"), columns=min(len(prompts), 8))
    print(f"wrote {os.path.join(run_dir, 'samples.pt')} and samples.png ({len(images)} images)")


if __name__ == "__main__":
    main()
