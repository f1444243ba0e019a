"""Stage 05: train TextRIN by flow matching on reward-conditioned data (paper eq. 2).

Each training image x comes with a caption c and its reward levels s = bins / (B - 1)
(03_bin.py). With t ~ U(0, 1) (logit-normal as an option) and noise eps ~ N(0, I):

    x_t = (1 - t) x + t eps          t = 1 is pure noise, t = 0 is data
    loss = || v(x_t, t, c, s) - (eps - x) ||^2                        (paper eq. 2)

weighted by t^2 (--loss-weight image, the default): t^2 || v - (eps - x) ||^2 is the error of
the image the network implies, || x_hat - x ||^2 with x_hat = x_t - t v, the same optimum at
every t. Unweighted, a network that predicts the image (04_model.py, prediction "x") has its
error divided by t^2, and the nearly clean steps, where the caption no longer matters, drown
out the noisy ones, where it decides what is drawn. --loss-weight velocity is eq. 2 as written.

`--rewards none` trains the unconditioned baseline and `--rewards NAME` a single-reward
model with the same script: only the number of reward tokens changes. `--captions mix`
shows each image with its alt text, its long, short or brief caption (brief ones half the
time): the paper mixes the original alt text with synthetic long and short captions.

    python 05_train.py                                      # MIRO on the shapes world (tiny preset, CPU)
    python 05_train.py --eval-every 100                     # + EMA snapshots for 07's convergence curves
    python 05_train.py --rewards none --run baseline        # the same model without rewards
    python 05_train.py --rewards colourfulness --run only_colourfulness
    python 05_train.py --run miro --resume --steps 4000     # continue a run from its checkpoint
    python 05_train.py --text-encoder t5:google/flan-t5-base --run t5   # a frozen pretrained text encoder
    torchrun --nproc_per_node 8 05_train.py --preset small --compile --run-name small
                        # (torchrun reads "--run" as its own --run-path: say --run-name)
    python 05_train.py --benchmark --official               # train-step images/s and MFU, vs the released net

Reads OUT/images.npy, OUT/captions.pt, OUT/bins.pt; writes OUT/runs/RUN/ckpt.pt (every
--ckpt-every steps and at the end, atomically) and OUT/runs/RUN/log.jsonl (one JSON line
per logged step) and, with --eval-every N, OUT/runs/RUN/snapshots/STEP.pt every N steps: the EMA
weights in half precision, which 07_eval.py samples to draw reward against step (paper Fig. 5).
Prints one line per
--log-every steps: loss, lr, grad norm, images/s, MFU.
Every step's randomness (batch, t, noise, caption choice) is seeded by (seed, step, rank),
so a resumed run is bit-for-bit the run that was never stopped.
"""
import argparse
import atexit
import copy
import functools
import glob
import importlib
import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

world = importlib.import_module("01_caption")   # file helpers
net = importlib.import_module("04_model")       # TextRIN, presets, tokenizer, FLOP counter
STAGE, VERSION = "05_train.py", 1


# ----------------------------------------------------------------------------- flow matching (eq. 2)
def sample_t(batch, dist_name, generator, device, shift=1.0):
    """t in (0, 1): uniform, or logit-normal (more steps at mid noise, as in SD3); then shifted
    towards noise by t -> s t / (1 + (s - 1) t) (SD3's shift s; s = 1 leaves t as drawn)."""
    if dist_name == "logit-normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    else:
        t = torch.rand(batch, generator=generator, device=device)
    return shift * t / (1 + (shift - 1) * t)


def noisy(x, eps, t):
    """x_t = (1 - t) x + t eps: t = 1 is noise, t = 0 is data."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x + t * eps


def flow_matching_loss(model, x, eps, t, levels, ids, self_cond, weight="image"):
    """Per-image loss ||v(x_t) - (eps - x)||^2 (paper eq. 2), times max(t, T_MIN)^2 with
    weight "image" (the squared error of x_hat = x_t - t v), with self-conditioning.

    self_cond (B,) is 1 where the network first makes a guess without gradients and then
    sees its own (detached) latents or clean-image estimate (04_model.TextRIN's self_cond),
    0 where it sees zeros, as at the first sampling step.
    Both passes run inside one call of the model, so that DDP and torch.compile see one forward.
    """
    if not self_cond.any():  # no image would use the first pass: skip it
        self_cond = None
    x_t = noisy(x, eps, t)
    v, _ = model(x_t, t, levels, ids, self_cond=self_cond)  # both passes in one call (04_model.py)
    loss = (v.float() - (eps - x)).square().mean(dim=(1, 2, 3))  # (B,) paper eq. 2
    if weight == "image":  # t^2 ||v - (eps - x)||^2 = ||x_hat - x||^2
        loss = loss * t.float().clamp_min(net.T_MIN).square()
    return loss


# ----------------------------------------------------------------------------- data
CAPTION_KINDS = ("alt", "long", "short", "brief")  # captions.pt's (a folder of images has no brief ones)
# --captions mix: each kind the dataset has, brief ones three times as often as each other kind, so that
# captions that leave a colour or a place open (the GenEval prompts "a circle.", "three squares.") are common
MIX = ("alt", "long", "short", "brief", "brief", "brief")
# --relation-steps: t is shifted this far towards noise, so that nearly every draw is at t > 0.9, where the noisy
# image does not yet show where the objects are and only the caption's relation sentence can say it
RELATION_T_SHIFT = 1000.0


def load_data(out, reward_spec, captions_mode, text_len, text_encoder, relation_objects=4):
    """Images (memory-mapped), token ids per caption kind, reward levels in [0, 1], names, bins, the caption
    kinds, the indices of the scenes whose short caption states a relation (with at most relation_objects
    objects) and those of the scenes of two or more objects of one kind (what "three squares." asks for)."""
    images = world.load_images(os.path.join(out, "images.npy"), STAGE)
    captions = world.load_pt(os.path.join(out, "captions.pt"), ["alt", "long", "short"], STAGE, "01_caption.py")
    bins = world.load_pt(os.path.join(out, "bins.pt"), ["names", "num_bins", "edges", "bins"], STAGE, "03_bin.py")
    N = len(images)
    world.check_pair(images, captions, STAGE)
    if len(bins["bins"]) != N or bins.get("dataset") != world.dataset_id(captions):
        why = f"{len(bins['bins'])} images, not {N}" if len(bins["bins"]) != N else "its captions' fingerprint differs"
        sys.exit(f"{STAGE}: error: bins.pt was made from another dataset ({why}): re-run 02_score.py and 03_bin.py")
    if reward_spec == "none":  # the baseline
        names = []
    elif reward_spec == "all":
        names = list(bins["names"])
    else:
        names = reward_spec.split(",")
    unknown = [name for name in names if name not in bins["names"]]
    if unknown:
        sys.exit(f"{STAGE}: error: unknown reward {', '.join(unknown)}; bins.pt has: {', '.join(bins['names'])}")
    columns = [list(bins["names"]).index(name) for name in names]
    levels = bins["bins"][:, columns].float() / (bins["num_bins"] - 1)  # (N, R) in [0, 1]
    if captions_mode == "mix":  # a folder has no brief captions
        kinds = [kind for kind in MIX if kind in captions]
    else:  # a list such as long,brief,brief: each image shows one of them, a kind listed twice twice as often
        kinds = captions_mode.split(",")
    for kind in kinds:
        if kind not in CAPTION_KINDS or kind not in captions:
            sys.exit(f"{STAGE}: error: --captions {captions_mode}: captions.pt has no {kind} captions "
                     f"(it has {', '.join(k for k in CAPTION_KINDS if k in captions)})")
    ids = torch.stack([net.tokenize(captions[kind], text_len, text_encoder) for kind in kinds])  # (kinds, N, L)
    # the shapes world's scenes whose short caption states a relation (none for a folder of images)
    relation = torch.tensor([i for i, m in enumerate(captions.get("meta", [])) if m.get("scene", {}).get("relation")
                             and len(m["scene"]["objects"]) <= relation_objects], dtype=torch.long)
    count = torch.tensor([i for i, m in enumerate(captions.get("meta", [])) if len(m.get("scene", {}).get("objects", [])) > 1
                          and len({o["kind"] for o in m["scene"]["objects"]}) == 1], dtype=torch.long)
    return images, ids, levels, names, bins, kinds, relation, count


@functools.lru_cache(maxsize=2)
def epoch_order(epoch, n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, batch, n, seed):
    """Global batch number `step`: the next `batch` images of an endless run of seeded epochs."""
    start = step * batch
    first, last = start // n, (start + batch - 1) // n
    order = torch.cat([epoch_order(e, n, seed) for e in range(first, last + 1)])
    return order[start - first * n: start - first * n + batch]


def get_batch(step, args, data, rank, world_size, device):
    """This rank's share of global batch `step`: images in [-1, 1], token ids, levels, and its RNG.

    data = (images, ids, levels, kind_of, scenes): kind_of[phase] the caption kind a phase shows (an index into
    ids), scenes[phase] the only scenes it shows (all when a phase has none); phase(step, args) says which."""
    images, ids, levels, kind_of, scenes = data
    seed = args.seed * 1_000_003 + step * 1009 + rank
    generator = torch.Generator().manual_seed(seed)
    now = phase(step, args)
    if now in scenes:  # the same global batch on every rank, drawn with replacement
        pick = torch.randint(len(scenes[now]), (args.batch_size,), generator=torch.Generator().manual_seed(seed - rank))
        idx = scenes[now][pick].view(world_size, -1)[rank]
    else:
        idx = batch_indices(step, args.batch_size, len(images), args.seed).view(world_size, -1)[rank]
    idx = idx.sort().values  # sorted reads are faster on a memory map
    x = world.to_signed(images[idx.numpy()], device)  # (B, 3, H, W)
    kind = torch.randint(len(ids), (len(idx),), generator=generator)  # which of the --captions kinds
    if now is not None:
        kind[:] = kind_of[now]
    batch_ids = ids[kind, idx]                                          # (B, L)
    drop = torch.rand(len(idx), generator=generator) < args.text_drop  # empty caption: the CFG "no text"
    batch_ids[drop] = net.tokenize([""], batch_ids.shape[1], args.text_encoder)
    # padding is masked everywhere, so only the batch's longest caption (rounded up to 8) is kept
    longest = int((batch_ids != net.PAD_ID).sum(1).max())
    batch_ids = batch_ids[:, : min(batch_ids.shape[1], -(-longest // 8) * 8)]
    return x, batch_ids.to(device), levels[idx].to(device), torch.Generator(device).manual_seed(seed)


def phase(step, args):
    """What step `step` teaches, or None (the caption mix): "long" for the first --long-first steps (long
    captions: every object with its cell); after them "relation" every --relation-every-th step (1: one block)
    until there were --relation-steps (where one object is relative to another); "count" for the step after
    each relation step until there were --count-steps (how many of one kind; --relation-every >= 2)."""
    since, every = step - args.long_first, args.relation_every
    if since < 0:
        return "long"
    if since % every == 0 and since // every < args.relation_steps:
        return "relation"
    if every > 1 and since % every == 1 and since // every < args.count_steps:
        return "count"
    return None


def net_overrides(spec):
    """--net 'patch_cond=true,patch_size=8' -> {setting: value}: the preset's network settings this run
    changes (04_model.TextRIN's arguments); numbers and true/false are read as such."""
    settings = {}
    for item in filter(None, spec.split(",")):
        key, sep, text = (part.strip() for part in item.partition("="))
        known = [k for k in inspect.signature(net.TextRIN).parameters if k not in ("num_rewards", "text_encoder")]
        if not sep or key not in known:
            sys.exit(f"{STAGE}: error: --net {item!r}: write SETTING=VALUE with a setting of {', '.join(known)}")
        if text.lower() in ("true", "false"):
            settings[key] = text.lower() == "true"
        else:
            for kind in (int, float, str):
                try:
                    settings[key] = kind(text)
                    break
                except ValueError:
                    continue
    return settings


# ----------------------------------------------------------------------------- optimisation
def lr_at(step, args):
    """Linear warmup, then cosine decay to lr / 10 at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices only (not on norms and biases); fused (one kernel for all tensors)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = []
    for text in (False, True):  # the own text encoder's parameters step --text-lr times as far
        params = [p for name, p in named if name.startswith("text.") == text]
        scale = args.text_lr if text else 1.0
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), fused=device.type in ("cuda", "cpu"))


def backward(loss, model, optimizer, scaler, max_norm):
    """loss.backward() (scaled under fp16), then clip; returns the gradient norm before clipping."""
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()


def update(optimizer, scaler):
    scaler.step(optimizer) if scaler else optimizer.step()
    if scaler:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def update_ema(ema, model, step, decay):
    decay = min(decay, (1 + step) / (10 + step))  # short runs: the average forgets the random init
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def amp_setup(amp, device):
    """(autocast context, GradScaler or None). bf16 on CUDA, fp16 + GradScaler without bf16, fp32 on CPU."""
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if amp == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    # cache_enabled=False: the self-conditioning pass runs under no_grad, and on older torch
    # versions a low-precision weight cached there carries no autograd history into the
    # second pass, so that weight would silently get no gradient
    context = torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return context, torch.amp.GradScaler(device.type) if amp == "fp16" else None


# ----------------------------------------------------------------------------- training
def run_edges(bins, names):
    """The bin edges (R, B + 1) of the run's rewards, in the run's order."""
    return bins["edges"][[list(bins["names"]).index(n) for n in names]]


def save_checkpoint(path, raw_model, ema, optimizer, step, model_args, names, bins, args):
    world.save_atomic({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                       "step": step, "model_args": model_args, "reward_names": names, "num_bins": bins["num_bins"],
                       "bin_edges": run_edges(bins, names),
                       "dataset": bins.get("dataset"),
                       "version": VERSION, "config": world.file_config(args)}, path)


def train(args):
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world_size = world.distributed(args.device)  # joins torchrun's process group (as 01 and 02 do)
    device = world.resolve_device(args.device, STAGE)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.batch_size % world_size:
        sys.exit(f"{STAGE}: error: --batch-size {args.batch_size} is not a multiple of the {world_size} processes")
    run_dir = os.path.join(args.out, "runs", args.run)
    ckpt_path, log_path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "log.jsonl")
    checkpoint = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            sys.exit(f"{STAGE}: error: --resume: no checkpoint at {ckpt_path}: train without --resume first")
        checkpoint = world.load_pt(ckpt_path, ["model", "ema", "optimizer", "step", "model_args"], STAGE, STAGE)
        check_resume(checkpoint, args)
    elif not args.overwrite and (os.path.exists(ckpt_path) or os.path.exists(log_path)):
        sys.exit(f"{STAGE}: error: run {args.run} exists in {run_dir}: pass --resume to continue it, "
                 f"--overwrite to start it afresh, or another --run")
    if args.preset is None:  # a resumed run keeps its preset; a new one is tiny unless told
        args.preset = checkpoint.get("config", {}).get("preset", "tiny") if checkpoint else "tiny"
    model_args = checkpoint["model_args"] if checkpoint else None
    trained_with = model_args.get("text_encoder", "own") if model_args else args.text_encoder
    if trained_with != args.text_encoder:
        sys.exit(f"{STAGE}: error: --resume: the run was trained with --text-encoder {trained_with}, "
                 f"not {args.text_encoder}")
    overrides = net_overrides(args.net)
    if model_args:
        text_len = model_args["text_len"]
    else:
        text_len = overrides.get("text_len", net.PRESETS[args.preset]["text_len"])
    images, ids, levels, names, bins, kinds, relation, count = load_data(args.out, args.rewards, args.captions, text_len,
                                                                   args.text_encoder, args.relation_objects)
    if args.long_first and "long" not in kinds:
        sys.exit(f"{STAGE}: error: --long-first needs long captions in --captions (it is {args.captions})")
    if args.relation_steps and ("short" not in kinds or not len(relation)):
        sys.exit(f"{STAGE}: error: --relation-steps needs short captions in --captions and scenes with a relation "
                 f"(the shapes world's clean or full)")
    if args.count_steps and ("brief" not in kinds or not len(count) or args.relation_every < 2):
        sys.exit(f"{STAGE}: error: --count-steps needs brief captions in --captions, scenes of several objects of one "
                 f"kind and --relation-every 2 or more")
    kind_of = {name: kinds.index(kind) for name, kind, steps in (("long", "long", args.long_first),
               ("relation", "short", args.relation_steps), ("count", "brief", args.count_steps)) if steps}
    if model_args is None:  # the checkpoint records the text encoder, so 06/07 rebuild (and reload) it
        model_args = dict(net.PRESETS[args.preset], num_rewards=len(names), text_encoder=args.text_encoder, **overrides)
    changed = {k: v for k, v in overrides.items() if model_args.get(k) != v}
    if changed:
        sys.exit(f"{STAGE}: error: --resume: the run was trained with other network settings than --net {args.net}")
    if model_args["image_size"] != images.shape[1]:
        sys.exit(f"{STAGE}: error: preset {args.preset} is {model_args['image_size']} px but images.npy holds "
                 f"{images.shape[1]} px images: pick another --preset or re-run 01_caption.py --size")
    if checkpoint and checkpoint["reward_names"] != names:
        sys.exit(f"{STAGE}: error: --resume: the run was trained on rewards {checkpoint['reward_names']}, not {names}")
    if checkpoint:
        check_resume_data(checkpoint, bins)
    torch.manual_seed(args.seed)
    if checkpoint:  # the network the checkpoint describes, or one line if it holds none of this code
        raw_model = net.rebuild(model_args, checkpoint["model"], ckpt_path, STAGE).to(device)
        ema = net.rebuild(model_args, checkpoint["ema"], ckpt_path, STAGE).to(device).requires_grad_(False)
    else:
        try:
            raw_model = net.TextRIN(**model_args).to(device)
        except ValueError as e:  # a setting of --net the network refuses
            sys.exit(f"{STAGE}: error: --net {args.net or '(preset)'}: {e}")
        if model_args.get("interface") == "pca":  # the interface starts from the PCA of 2,048 training images' patches
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:2048].sort().values
            raw_model.fit_interface(world.to_signed(images[pick.numpy()], device))
        ema = copy.deepcopy(raw_model).requires_grad_(False)
    if rank == 0:  # the network is built: only now is anything written
        world.prepare_out(run_dir, STAGE)
        take_lock(run_dir)
        for stale in glob.glob(glob.escape(ckpt_path) + ".tmp*"):  # a save that a killed process left half done
            os.remove(stale)
    optimizer = make_optimizer(raw_model, args, device)
    step = 0
    if checkpoint:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            sys.exit(f"{STAGE}: error: {ckpt_path} holds an optimizer state of another network "
                     f"({type(e).__name__}): train the run afresh with --overwrite")
        step = checkpoint["step"]
    autocast, scaler = amp_setup(args.amp, device)
    flops_per_image = train_flops_per_image(raw_model, model_args, args.self_cond)
    peak = peak_flops(device, args.amp, args.peak_tflops)
    model = torch.compile(raw_model) if args.compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if rank == 0:
        params = sum(p.numel() for p in raw_model.parameters())
        print(f"run {args.run}: {args.preset} TextRIN {params / 1e6:.1f}M params, rewards {names or 'none (baseline)'}, "
              f"captions {args.captions}, text {args.text_encoder}, {len(images)} images, batch {args.batch_size} on "
              f"{world_size} x {device}, steps {step} -> {args.stop_at or args.steps}")
        kept = []  # the log keeps exactly the steps the checkpoint has seen
        if checkpoint and os.path.exists(log_path):
            kept = [r for r in world.read_jsonl(log_path, STAGE) if r.get("step", step + 1) <= step]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        for snapshot in glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*.pt")):
            if int(os.path.basename(snapshot)[:-3]) > step:  # from after the checkpoint, or an earlier run's
                os.remove(snapshot)

    data = (images, ids, levels, kind_of, {"relation": relation, "count": count})
    last_good, window, started = step, [], time.perf_counter()
    end = min(args.stop_at or args.steps, args.steps)
    while step < end:
        x, batch_ids, batch_levels, generator = get_batch(step, args, data, rank, world_size, device)
        shift = RELATION_T_SHIFT if phase(step, args) == "relation" else args.t_shift
        t = sample_t(len(x), args.t_dist, generator, device, shift)
        eps = torch.randn(x.shape, generator=generator, device=device)
        self_cond = (torch.rand(len(x), generator=generator, device=device) < args.self_cond).float()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args) * group["lr_scale"]
        with autocast:
            per_image = flow_matching_loss(model, x, eps, t, batch_levels, batch_ids, self_cond, args.loss_weight)
        loss = per_image.mean()
        grad_norm = backward(loss, raw_model, optimizer, scaler, args.grad_clip)
        loss_value = loss.item()
        if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(grad_norm)):
            kept = f"{ckpt_path} keeps step {last_good}, the last good checkpoint" if last_good else "no checkpoint was written"
            sys.exit(f"{STAGE}: error: non-finite loss ({loss_value}, grad norm {grad_norm}) at step {step + 1}: "
                     f"stopped; {kept}")
        update(optimizer, scaler)
        update_ema(ema, raw_model, step, args.ema)
        step += 1
        window.append((loss_value, t.detach().cpu(), per_image.detach().float().cpu()))

        if step % args.log_every == 0 or step == end:
            elapsed, started = time.perf_counter() - started, time.perf_counter()
            record = log_record(step, window, elapsed, grad_norm, flops_per_image / peak if peak else None, args)
            if ddp:  # ranks must hold the same parameters: compare a checksum of each
                checksum = sum(p.double().sum() for p in raw_model.parameters()).reshape(1)
                gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
                dist.all_gather(gathered, checksum)
                record["param_checksums"] = [g.item() for g in gathered]
            window = []
            if rank == 0:
                mfu = f"{100 * record['mfu']:.1f}%" if peak else "-"
                print(f"step {step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm {grad_norm:.3f} "
                      f"| {record['images_per_s']:7.1f} img/s | MFU {mfu}", flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if (step % args.log_every == 0 or step % args.ckpt_every == 0 or step == end) and not all(
                torch.isfinite(p).all() for p in raw_model.parameters()):  # an update can overflow on a finite loss
            kept = f"{ckpt_path} keeps step {last_good}, the last good checkpoint" if last_good else "no checkpoint was written"
            sys.exit(f"{STAGE}: error: non-finite weights after step {step}: stopped; {kept}")
        if rank == 0 and (step % args.ckpt_every == 0 or step == end):
            save_checkpoint(ckpt_path, raw_model, ema, optimizer, step, model_args, names, bins, args)
            last_good = step
        if rank == 0 and args.eval_every and (step % args.eval_every == 0 or step == end):
            save_snapshot(run_dir, ema, step)
    if rank == 0:
        print(f"saved {ckpt_path} at step {step}")
    if ddp:
        dist.destroy_process_group()


def log_record(step, window, elapsed, grad_norm, mfu_per_image, args):
    """One log.jsonl line for the steps of `window` [(loss, t, per-image loss)]: mean loss, lr, grad norm,
    images/s, MFU (None without a known peak), and the loss per quarter of t, where the model still struggles."""
    images_per_s = len(window) * args.batch_size / elapsed
    t_all, loss_all = torch.cat([w[1] for w in window]), torch.cat([w[2] for w in window])
    quarter = (t_all * 4).long().clamp(max=3)
    return {"step": step, "loss": sum(w[0] for w in window) / len(window), "lr": lr_at(step - 1, args),
            "grad_norm": grad_norm, "images_per_s": images_per_s,
            "mfu": images_per_s * mfu_per_image if mfu_per_image else None,
            "loss_by_t": [loss_all[quarter == q].mean().item() if (quarter == q).any() else None for q in range(4)]}


def save_snapshot(run_dir, ema, step):
    """The EMA weights at this step, in half precision (half the disk; 07_eval.py samples them in
    float32): what 07 needs to draw reward against training step, without 05 calling 07."""
    os.makedirs(os.path.join(run_dir, "snapshots"), exist_ok=True)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    world.save_atomic({"ema": weights, "step": step, "version": VERSION},
                      os.path.join(run_dir, "snapshots", f"{step:07d}.pt"))


# ============================================================================= runs kept whole
# What train() checks so that a run is never trained over, mixed with another dataset or owned by
# two processes (not needed to follow the training itself).
def check_resume(checkpoint, args):
    """--resume continues the run it finds: the flags that would change what it is stop in one line."""
    preset = checkpoint.get("config", {}).get("preset")
    if args.preset and preset and args.preset != preset:
        sys.exit(f"{STAGE}: error: --resume: the run was trained with --preset {preset}, not {args.preset}")
    if args.steps < checkpoint["step"]:
        sys.exit(f"{STAGE}: error: --resume: the checkpoint is at step {checkpoint['step']}, past --steps {args.steps}")


def check_resume_data(checkpoint, bins):
    """The run continues on the data and reward levels it began with (a re-binned or other dataset
    would change what each level means)."""
    if checkpoint.get("dataset") not in (None, bins.get("dataset")):
        sys.exit(f"{STAGE}: error: --resume: the run was trained on another dataset than the one in this --out "
                 f"(its fingerprint differs): resume it in its own folder or train a new run")
    if "num_bins" in checkpoint and checkpoint["num_bins"] != bins["num_bins"]:
        sys.exit(f"{STAGE}: error: --resume: the run was trained with {checkpoint['num_bins']} bins but bins.pt has "
                 f"{bins['num_bins']}: re-run 03_bin.py --bins {checkpoint['num_bins']} or train a new run")
    names = checkpoint.get("reward_names", [])
    if names and not torch.allclose(checkpoint["bin_edges"].double(), run_edges(bins, names).double()):
        sys.exit(f"{STAGE}: error: --resume: bins.pt has other bin edges than the run was trained with "
                 f"(03_bin.py re-run with other settings?): restore them or train a new run")


def take_lock(run_dir):
    """One process trains a run at a time: a lock file with its process id, removed at exit. A lock
    whose process is gone (killed) is taken over."""
    path = os.path.join(run_dir, "lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            try:  # a lock without a pid yet was made this instant by a process still writing it
                fresh = not owner and time.time() - os.path.getmtime(path) < 10
            except OSError:
                fresh = False
            if fresh or (owner and owner != os.getpid() and world.process_alive(owner)):
                sys.exit(f"{STAGE}: error: run {os.path.basename(run_dir)} is being trained by process "
                         f"{owner or 'starting now'} ({path}): wait for it or stop it")
            try:
                os.remove(path)  # its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release_lock, path)
        return


def release_lock(path):
    if os.path.exists(path):
        os.remove(path)


# ============================================================================= benchmark
# --benchmark: train-step throughput and MFU on random data, and the FLOP counts train() logs MFU
# with (not needed to follow the training).
def peak_flops(device, amp, override):
    """Peak FLOP/s for MFU: --peak-tflops, a known GPU's dense bf16 peak, or a measured CPU matmul."""
    if override:
        return override * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
        return next((flops for key, flops in known.items() if key in name), None)
    a = torch.randn(1024, 1024, dtype=torch.bfloat16 if amp == "bf16" else torch.float32)
    best = 0.0
    for _ in range(6):  # the best of a few tries: a busy CPU only ever slows a try down
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        best = max(best, 4 * 2 * 1024 ** 3 / (time.perf_counter() - start))
    return best


def train_flops_per_image(model, model_args, self_cond_rate):
    """FLOPs of one image's training step, counted by torch.utils.flop_counter on the real step."""
    x, t, levels, ids = net.dummy_inputs(model_args, 1, next(model.parameters()).device)
    self_cond = torch.ones(1, device=x.device) if self_cond_rate > 0 else None  # its pass runs for the whole batch
    flops = net.count_flops(lambda: model(x, t, levels, ids, self_cond=self_cond)[0].sum().backward())
    model.zero_grad(set_to_none=True)
    return flops


class OfficialNetwork(torch.nn.Module):
    """The released MIRO network (pip install miro-t2i einops) behind TextRIN's call, for timing only.

    Same width, depth, latents and conditioning tokens as the preset: the latents attend to
    the conditioning in every block (use_cond_rin_block) instead of carrying it as extra
    latents, exactly as TextRIN does. A trainable embedding stands in for its frozen T5.
    """

    def __init__(self, model_args):
        super().__init__()
        from miro.models.networks.rin import CADRINTextCond
        a, self.R = model_args, model_args["num_rewards"]
        self.embed = torch.nn.Embedding(net.VOCAB_SIZE, a["text_dim"])
        self.net = CADRINTextCond(
            data_size=a["image_size"], data_dim=a["data_dim"], num_input_channels=3, num_latents=a["num_latents"],
            latents_dim=a["latent_dim"], label_dim=a["text_dim"], num_processing_layers=a["num_layers"],
            num_blocks=a["num_blocks"], patch_size=a["patch_size"], num_cond_tokens=0, read_write_heads=a["heads"],
            compute_heads=a["heads"], use_cond_rin_block=True, concat_cond_token_to_latents=False,
            use_self_conditioning=True, num_text_registers=16, coherence_keys=[f"r{i}" for i in range(self.R)])

    def forward(self, x_t, t, levels, ids, prev_latents=None, self_cond=None):
        batch = {"y": x_t, "gamma": 1 - t, "text_tokens_embeddings": self.embed(ids), "text_tokens_mask": ids != net.PAD_ID,
                 **{f"r{i}_coherence": levels[:, i] for i in range(self.R)}}
        if self_cond is not None:  # the same two passes as TextRIN's
            with torch.no_grad():
                _, guess = self.net({**batch, "previous_latents": None})
            prev_latents = guess * self_cond.view(-1, 1, 1)
        batch["previous_latents"] = prev_latents
        return self.net(batch)


def time_train_steps(model, model_args, args, device, peak):
    """images/s and MFU of the training step of `model` on random data (same step as train())."""
    model = model.to(device)
    optimizer = make_optimizer(model, args, device)
    flops_per_image = train_flops_per_image(model, model_args, args.self_cond)
    compiled = torch.compile(model) if args.compile else model
    autocast, scaler = amp_setup(args.amp, device)
    x, t, levels, ids = net.dummy_inputs(model_args, args.batch_size, device)
    eps, self_cond = torch.randn_like(x), (torch.rand(len(x), device=device) < args.self_cond).float()

    def one_step():
        with autocast:
            loss = flow_matching_loss(compiled, x, eps, t, levels, ids, self_cond, args.loss_weight).mean()
        backward(loss, model, optimizer, scaler, args.grad_clip)
        update(optimizer, scaler)

    for _ in range(3):  # untimed: compilation and allocator warm-up
        one_step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.bench_steps):
        one_step()
    sync()
    images_per_s = args.bench_steps * args.batch_size / (time.perf_counter() - start)
    return images_per_s, flops_per_image, images_per_s * flops_per_image / peak if peak else None


def benchmark(args):
    """Train-step throughput and MFU per preset on this device (and of the released network with --official)."""
    device = world.resolve_device(args.device, STAGE)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device, args.amp, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"train step on {name}, amp {args.amp}, compile {args.compile}, batch {args.batch_size}, "
          f"peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s" + (" (measured matmul)" if device.type == "cpu"
                                                                         and not args.peak_tflops else ""))
    print(f"{'preset':>6} {'network':>9} {'params':>8} {'GFLOP/img':>10} {'img/s':>9} {'MFU':>6}")
    for preset in args.bench_presets.split(","):
        model_args = dict(net.PRESETS[preset], num_rewards=7)  # the paper's 7 rewards
        networks = [("TextRIN", lambda: net.TextRIN(**model_args))]
        if args.official:
            networks.append(("official", lambda: OfficialNetwork(model_args)))
        throughput = []
        for label, make in networks:
            torch.manual_seed(0)
            model = make()
            images_per_s, flops, mfu = time_train_steps(model, model_args, args, device, peak)
            params = sum(p.numel() for p in model.parameters())
            print(f"{preset:>6} {label:>9} {params / 1e6:7.1f}M {flops / 1e9:10.2f} {images_per_s:9.1f} "
                  f"{f'{100 * mfu:.1f}%' if mfu else '-':>6}", flush=True)
            throughput.append(images_per_s)
            del model
        if len(throughput) == 2:
            print(f"{preset:>6} TextRIN / official train-step throughput: {throughput[0] / throughput[1]:.2f}x")


# ============================================================================= the command line
def main():
    parser = world.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="working folder (reads images.npy, captions.pt, bins.pt)")
    parser.add_argument("--run", "--run-name", dest="run", default="miro",
                        help="run name: writes OUT/runs/RUN/ckpt.pt and log.jsonl (--run-name under torchrun)")
    parser.add_argument("--preset", help=f"network size: {', '.join(net.PRESETS)} (default tiny, or the run's on --resume)")
    parser.add_argument("--rewards", default="all", help="all, none (the baseline) or comma-separated names")
    parser.add_argument("--captions", default="mix", help="caption shown with each image: mix (" + ",".join(MIX) +
                        ") or a list of kinds, alt, long, short, brief (long,brief,brief: a third long, two thirds brief)")
    parser.add_argument("--steps", type=world.count, default=600, help="total training steps (sets the lr schedule)")
    parser.add_argument("--long-first", type=world.natural, default=0,
                        help="steps at the start that show only the long captions (each object with its cell)")
    parser.add_argument("--relation-steps", type=world.natural, default=0,
                        help="steps after --long-first that show only scenes with a relation, their short captions, "
                             "nearly all at t > 0.9")
    parser.add_argument("--relation-every", type=world.count, default=1,
                        help="after --long-first, every this-th step is a relation step (1: the --relation-steps in one block)")
    parser.add_argument("--count-steps", type=world.natural, default=0,
                        help="steps that show only scenes of several objects of one kind with their brief captions, "
                             "each the step after a relation step")
    parser.add_argument("--relation-objects", type=world.count, default=4,
                        help="the --relation-steps show scenes of at most this many objects")
    parser.add_argument("--stop-at", type=world.natural, default=0, help="stop early at this step (resume later with --resume)")
    parser.add_argument("--batch-size", type=world.count, default=16, help="global batch size (split across processes)")
    parser.add_argument("--lr", type=world.positive, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--text-lr", type=world.positive, default=1.0,
                        help="learning rate of the own text encoder, as a multiple of --lr")
    parser.add_argument("--warmup", type=world.natural, default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=world.non_negative, default=0.01, help="AdamW weight decay on matrices")
    parser.add_argument("--grad-clip", type=world.positive, default=1.0, help="max gradient norm")
    parser.add_argument("--ema", type=world.fraction, default=0.999, help="EMA decay of the weights kept for sampling")
    parser.add_argument("--self-cond", type=world.fraction, default=0.9, help="probability of self-conditioning (on the latents, or with --net self_cond=image on the "
                        "clean-image estimate)")
    parser.add_argument("--net", default="", help="network settings that replace the preset's, e.g. "
                        "patch_cond=true,cell_codes=random (04_model.TextRIN's arguments)")
    parser.add_argument("--text-encoder", default="own", help="own (a small transformer trained with the net) or "
                        "frozen: openclip:ARCH[:PRETRAINED_OR_PATH] (e.g. openclip:ViT-H-14:laion2b_s32b_b79k) or "
                        "t5:ID_OR_PATH (e.g. t5:google/flan-t5-xl); only a projection of it is trained")
    parser.add_argument("--text-drop", type=world.fraction, default=0.1, help="probability of an empty caption (text CFG)")
    parser.add_argument("--loss-weight", default="image", choices=["image", "velocity"],
                        help="image: eq. 2 times t^2, the error of the implied clean image; velocity: eq. 2 as written")
    parser.add_argument("--t-dist", default="uniform", choices=["uniform", "logit-normal"], help="distribution of t")
    parser.add_argument("--t-shift", type=world.positive, default=1.0, help="shift t towards noise (> 1) or data (< 1)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="autocast: auto = bf16 on CUDA (fp16 + GradScaler without bf16), off on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=world.natural, default=0, help="seed of the initialisation and of every step's draws")
    parser.add_argument("--log-every", type=world.count, default=25, help="steps between log lines")
    parser.add_argument("--ckpt-every", type=world.count, default=500, help="steps between checkpoints")
    parser.add_argument("--eval-every", type=world.natural, default=0,
                        help="steps between EMA snapshots for 07_eval.py's convergence curves (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue OUT/runs/RUN from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start OUT/runs/RUN afresh even if it exists")
    parser.add_argument("--peak-tflops", type=world.non_negative, default=0, help="peak TFLOP/s for MFU (default: known GPU or measured CPU)")
    parser.add_argument("--benchmark", action="store_true", help="time train steps on random data, print img/s and MFU")
    parser.add_argument("--bench-presets", default="tiny", help="presets to benchmark, comma-separated")
    parser.add_argument("--bench-steps", type=world.count, default=10, help="timed steps per benchmark")
    parser.add_argument("--official", action="store_true", help="also time the released MIRO network (miro-t2i)")
    args = parser.parse_args()
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite starts it afresh: pass one of them")
    bad_presets = [p for p in [args.preset or "tiny"] + args.bench_presets.split(",") if p not in net.PRESETS]
    if bad_presets:
        sys.exit(f"{STAGE}: error: unknown preset {', '.join(bad_presets)}; known: {', '.join(net.PRESETS)}")
    if min(args.steps, args.batch_size, args.log_every, args.ckpt_every) < 1:
        sys.exit(f"{STAGE}: error: --steps, --batch-size, --log-every and --ckpt-every must be >= 1")
    benchmark(args) if args.benchmark else train(args)


if __name__ == "__main__":
    main()
