"""Stage 07: evaluate runs: reward means, GenEval-style scores, and a run-vs-run report.

GenEval-style evaluation on the shapes world. GenEval (Ghosh et al. 2023) asks for
short object-level prompts in six tasks and judges each image right or wrong with an
object detector; a task's score is the mean over its images and the overall score the
mean of the six tasks. Here the judge is the detector of 02_score.py and the prompts
are written in the caption language of 01_caption.py, so a model trained on those
captions can read them:

    single_object  a circle.                           the object is there
    two_object     a circle and a triangle.            both are there
    counting       three squares.                      exactly three (2 to 4 are asked)
    colors         a blue circle.                      the object has the colour
    position       a red circle and a blue square. the red circle is left of the blue square.
    color_attr     a red circle and a blue square.     each object has its own colour

Each prompt is stored in GenEval's metadata schema: {"tag": task, "prompt": text,
"include": [{"class", "count", "color"?, "position"?: [word, index of an earlier
include]}], "exclude": [{"class", "count"}]}. One departure from GenEval: position
also checks the two colours, because the shapes world names an object in a relation by
colour and kind (see geneval_prompts). Every prompt fits the 2x2 layout (at most
four objects, one per cell): the tests render a scene for each prompt and check that the
judge calls it right.

The report compares runs (rows) on every reward, every task and each fact the alignment
reward checks (alignment_facts), each number the mean
± std over sampling seeds at the top reward target s+ = 1, s- = 0 with guidance w (text
guidance for a run without rewards), and draws the paper's figures on the shapes world:
the radar of Fig. 4, reward against training step from the EMA snapshots 05_train.py saves
(Fig. 5) with the convergence speed-up per metric (the baseline's steps to its final
value over the steps MIRO takes to first reach it), best of N = 1, 2, 4, 8 (Fig. 8), a
sweep of one reward's positive target and of w (Fig. 12), and the per-reward isolation
grid (Fig. 9).

    python 07_eval.py                       # every run in OUT/runs: MIRO first, then the baseline
    python 07_eval.py --runs miro,baseline,colourfulness --cfg 2
    python 07_eval.py --geneval-prompts     # the prompt set: counts and two examples per task

Reads OUT/runs/NAME/ckpt.pt, log.jsonl and snapshots/ (05_train.py --eval-every); writes OUT/eval/report.md (the tables, the
figures embedded), OUT/eval/results.json (every number, per seed) and OUT/eval/*.png.
"""
import argparse
import dataclasses
import glob
import importlib
import json
import os
import shutil
import sys

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch

world = importlib.import_module("01_caption")  # colours, kinds, the 2x2 layout, captions
rewards = importlib.import_module("02_score")  # the detector, the relation test, the rewards
net = importlib.import_module("04_model")       # the tokenizer (the contrast probe)
sampler = importlib.import_module("06_sample")  # guided sampling (paper eq. 3)
STAGE = "07_eval.py"

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's order
# The tasks a world can draw: one object an image asks for no second object, count or relation.
WORLD_TASKS = {"one": ("single_object", "colors"), "clean": TASKS, "full": TASKS}
PER_TASK = 64          # prompts per task (GenEval has 80 to 100)
PROBE_TS, PROBE_SEED = (0.05, 0.5, 0.8), 12345  # the contrast probe's noise levels and its images' seed
COUNTS = (2, 3, 4)     # counting asks for 2 to 4, like GenEval; 4 fills the layout
WORDS = ("left of", "right of", "above", "below")
GRID_COLUMNS = 8       # images per task in the report's grid of GenEval-style samples
DETECT_BATCH = 512     # images per detector call (the same detector, and threshold, as the alignment reward)


# ----------------------------------------------------------------------------- GenEval prompts
def phrase(item):
    """An include item in caption words: 'a circle', 'an orange square', 'three triangles'."""
    words = ([item["color"]] if "color" in item else []) + [world.plural(item["class"], item["count"])]
    if item["count"] > 1:
        return " ".join([world.NUMBERS[item["count"]]] + words)
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def prompt_of(task, include):
    """The text of a prompt: the objects, then (position) the relation sentence.

    GenEval's position item points at the include it is placed against, which comes first;
    the text names the placed object first, as the shapes world's relation sentences do."""
    if task != "position":
        return world.join([phrase(item) for item in include]) + "."
    reference, placed = include
    relation = {"a": [placed["color"], placed["class"]], "word": placed["position"][0],
                "b": [reference["color"], reference["class"]]}
    return f"{phrase(placed)} and {phrase(reference)}. " + world.relation_sentence(relation)


def balanced(rng, options, n):
    """n options: whole shuffled passes over the list, so each occurs n/len(options) times (+-1)."""
    order = np.concatenate([rng.permutation(len(options)) for _ in range(-(-n // len(options)))])
    return [options[i] for i in order[:n]]


def geneval_prompts(per_task=PER_TASK, seed=0, tasks=TASKS):
    """The fixed GenEval prompt set: per_task metadata dicts per task of tasks, in TASKS order
    (a task's prompts do not depend on which other tasks are asked for).

    position judges colour and kind, unlike GenEval's class-only position: the shapes world
    names an object in a relation by colour and kind (that is all its captions ever do),
    so the include items carry the colours and the relation is judged between the objects
    the prompt names. A position image is therefore right only if its colours are right too."""
    rng = np.random.default_rng(seed)
    kinds, colours = world.KINDS, list(world.COLOURS)
    pairs = lambda xs: [(a, b) for a in xs for b in xs if a != b]  # ordered, distinct
    options = {
        "single_object": [[{"class": k, "count": 1}] for k in kinds],
        "two_object": [[{"class": a, "count": 1}, {"class": b, "count": 1}] for a, b in pairs(kinds)],
        "counting": [[{"class": k, "count": n}] for k in kinds for n in COUNTS],
        "colors": [[{"class": k, "count": 1, "color": c}] for k in kinds for c in colours],
        "position": [[{"class": b, "count": 1, "color": cb}, {"class": a, "count": 1, "color": ca, "position": [w, 0]}]
                     for a, b in pairs(kinds) for ca, cb in pairs(colours) for w in WORDS],
        "color_attr": [[{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
                       for a, b in pairs(kinds) for ca, cb in pairs(colours)],
    }
    metas = []
    for task in TASKS:
        chosen = balanced(rng, options[task], per_task)  # drawn for every task: the same rng stream
        if task not in tasks:
            continue
        for include in chosen:
            exclude = [{"class": include[0]["class"], "count": include[0]["count"] + 1}] if task == "counting" else []
            metas.append({"tag": task, "prompt": prompt_of(task, include), "include": include, "exclude": exclude})
    return metas


# ----------------------------------------------------------------------------- the judge
def judge(objects, meta, size):
    """GenEval's rule for one image, on the detector's objects {"colour", "kind", "cx", "cy"}.

    Each include item, in order, keeps the first `count` detected objects of its class
    and fails if there are fewer; with a colour, all of them must have it (GenEval keeps the
    most confident detections; the detector has no confidence, so the objects of the asked
    colour come first); with a position [word, j], each of them must stand in that relation
    to each object kept by include j, and fails if include j failed. Each exclude item fails
    the image if the class is detected `count` times or more (counting: exactly n)."""
    kept = []  # per include item: the objects it kept, or None where it failed
    for item in meta["include"]:
        same_class = [o for o in objects if o["kind"] == item["class"]]
        if "color" in item:
            same_class.sort(key=lambda o: o["colour"] != item["color"])  # stable: asked colour first
        found = same_class[:item["count"]]
        ok = len(found) == item["count"]
        if ok and "color" in item:
            ok = all(o["colour"] == item["color"] for o in found)
        if ok and "position" in item:
            word, j = item["position"]
            ok = kept[j] is not None and all(rewards.holds(o, word, t, size) for o in found for t in kept[j])
        kept.append(found if ok else None)
    excluded = any(sum(o["kind"] == item["class"] for o in objects) >= item["count"] for item in meta.get("exclude", []))
    return all(k is not None for k in kept) and not excluded


def correctness(images, metas):
    """Right or wrong per image: images uint8 [N, H, W, 3], one metadata dict each -> [N] bools."""
    if len(images) != len(metas):
        sys.exit(f"{STAGE}: error: {len(images)} images for {len(metas)} GenEval prompts")
    size = images.shape[1]
    right = []
    for start in range(0, len(images), DETECT_BATCH):
        found = rewards.detect(np.asarray(images[start:start + DETECT_BATCH]))
        right += [judge(objects, meta, size) for objects, meta in zip(found, metas[start:start + DETECT_BATCH])]
    return right


def geneval(images, metas):
    """GenEval scores: per task the fraction of its images judged right, and "overall", the
    mean of the task scores (tasks with no image are left out)."""
    right = correctness(images, metas)
    scores = {}
    for task in TASKS:
        marks = [r for r, meta in zip(right, metas) if meta["tag"] == task]
        if marks:
            scores[task] = float(np.mean(marks))
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


# ----------------------------------------------------------------------------- evaluating a model
FACTS = ("stated_drawn", "exact_counts", "relation", "nothing_else", "objects", "objects_stated", "other_caption")


def alignment_facts(images, captions):
    """What the alignment reward (02_score.py) finds, fact by fact, as means over captions:
    stated_drawn, every stated colour+kind detected at least once; exact_counts, the stated
    counts that are exact; relation, the stated relations that hold; nothing_else, no
    unstated object; objects and objects_stated, detected and stated objects per image;
    other_caption, the alignment reward of each image against the next caption, one it was
    not drawn for: the chance level, so that alignment minus it is what the caption earned."""
    marks = {fact: [] for fact in FACTS if fact != "other_caption"}
    scenes = rewards.detect(np.asarray(images))  # one reading of the images serves every fact
    for objects, caption in zip(scenes, captions):
        groups, relation = rewards.caption_facts(caption)
        if not groups:
            continue
        facts = rewards.check_facts(objects, groups, relation, images.shape[1])
        found = {(o["colour"], o["kind"]) for o in objects}
        marks["stated_drawn"].append(all(key in found for key in groups))
        marks["exact_counts"] += facts[:len(groups)]
        if relation is not None:
            marks["relation"].append(facts[len(groups)])
        marks["nothing_else"].append(facts[-1])
        marks["objects"].append(len(objects))
        marks["objects_stated"].append(sum(groups.values()))
    result = {fact: float(np.mean(m)) if m else float("nan") for fact, m in marks.items()}
    other = list(captions[1:]) + list(captions[:1])  # image i against caption i + 1
    return {**result, "other_caption": float(rewards.alignment(images, other, scenes=scenes).nanmean())}


def top_targets(R, n):
    """s+ = 1 and s- = 0 for every reward, n rows."""
    return [[1.0] * R] * n, [[0.0] * R] * n


def evaluate(model, names, seed, how, per_task=PER_TASK, n_captions=64, device="cpu", progress=False,
             world_name="full", grid_path=None):
    """One model, one sampling seed, at the top reward target, sampled as `how` (06's Sampling): the mean of
    every reward on fresh captions of the world, the alignment reward fact by fact, and the
    GenEval-style scores of the tasks the world can draw. {metric: float}. With grid_path, the
    first GRID_COLUMNS images of each task go to a PNG, a row per task, each under its prompt."""
    captions = sampler.fresh_captions(n_captions, world_name=world_name)
    metas = geneval_prompts(per_task, tasks=WORLD_TASKS[world_name])
    prompts = captions + [m["prompt"] for m in metas]
    images = sampler.generate(model, prompts, *top_targets(len(names), len(prompts)), seed, how, device=device,
                              progress=progress)
    result = {name: float(fn(images[:n_captions], captions).nanmean()) for name, fn in rewards.REWARDS.items()}
    result.update(alignment_facts(images[:n_captions], captions))
    result.update(geneval(images[n_captions:], metas))
    if grid_path:
        rows = [[i for i, m in enumerate(metas) if m["tag"] == task][:GRID_COLUMNS] for task in WORLD_TASKS[world_name]]
        shown = [i for row in rows for i in row]
        world.save_grid(images[n_captions:][shown], [metas[i]["prompt"] for i in shown], grid_path,
                          columns=GRID_COLUMNS, scale=4)
    return result


def best_of_curve(model, names, select, n_prompts, max_k, how, seed, device, world_name="full"):
    """Test-time scaling (paper Fig. 8): 2^max_k candidates per prompt; for N = 1, 2, 4, ... the
    mean over prompts of the best `select` score among the first N candidates."""
    captions = sampler.fresh_captions(n_prompts, world_name=world_name)
    K = 2 ** max_k
    prompts = [p for p in captions for _ in range(K)]
    images = sampler.generate(model, prompts, *top_targets(len(names), len(prompts)), seed, how, device=device)
    scores = rewards.REWARDS[select](images, prompts).view(n_prompts, K).nan_to_num(0.0)
    return {2 ** k: float(scores[:, :2 ** k].max(1).values.mean()) for k in range(max_k + 1)}


def sweep(model, names, reward, settings, n_prompts, how, seed, device, world_name="full"):
    """Paper Fig. 12: for each (level, w), sample with s+ = 1 except `reward` at that level and
    guidance w (the rest as `how` says); that reward's mean per setting."""
    captions, j, out = sampler.fresh_captions(n_prompts, world_name=world_name), names.index(reward), []
    for level, w in settings:
        s_plus = [[1.0] * j + [float(level)] + [1.0] * (len(names) - j - 1)] * n_prompts
        images = sampler.generate(model, captions, s_plus, [[0.0] * len(names)] * n_prompts, seed,
                                  dataclasses.replace(how, cfg=w), device=device)
        out.append(float(rewards.REWARDS[reward](images, captions).nanmean()))
    return out


def isolation_grid(model, names, n_prompts, how, seed, device, path, world_name="full"):
    """Paper Fig. 9: a row per reward j, guided along j alone (s- = s+ = 1 except s-_j = 0), then a row per
    reward guided towards its low end (s- = s+ = 1 except s+_j = 0), the same noise in every row; the first
    row guides along all rewards at once."""
    captions, R = sampler.fresh_captions(n_prompts, world_name=world_name), len(names)
    but = lambda j, level: [level if i == j else 1.0 for i in range(R)]  # 1 for every reward but j
    rows = ([("all rewards", [1.0] * R, [0.0] * R)] + [(f"only {n}", [1.0] * R, but(j, 0.0)) for j, n in enumerate(names)]
            + [(f"{n} at 0", but(j, 0.0), [1.0] * R) for j, n in enumerate(names)])
    images, labels = [], []
    for label, s_plus, s_minus in rows:
        images.append(sampler.generate(model, captions, [s_plus] * n_prompts, [s_minus] * n_prompts, seed, how,
                                       device=device))
        labels += [label] + [""] * (n_prompts - 1)
    world.save_grid(torch.cat(images), labels, path, columns=n_prompts)


# ----------------------------------------------------------------------------- the report
def read_log(out, run):
    """The training records of a run's log.jsonl (loss, lr, images/s per logged step)."""
    path = os.path.join(out, "runs", run, "log.jsonl")
    if not os.path.exists(path):
        sys.exit(f"{STAGE}: error: run {run} has no log at {path}: train it with 05_train.py")
    return [r for r in world.read_jsonl(path, STAGE) if "loss" in r]


def snapshot_evals(out, run, model, names, how, per_task, n_captions, world_name, device):
    """Reward against training step (paper Fig. 5): each EMA snapshot 05_train.py --eval-every saved,
    loaded into the run's network and evaluated as the final model is (sampled as `how`), on fewer prompts.
    [{"step", "eval": {metric: float}}] in step order; [] without snapshots."""
    folder = os.path.join(out, "runs", run, "snapshots")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    final = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    for name in files:
        snapshot = world.load_pt(os.path.join(folder, name), ["ema", "step"], STAGE, "05_train.py --eval-every")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in snapshot["ema"].items()})
        records.append({"step": snapshot["step"], "eval": evaluate(model, names, 0, how, per_task, n_captions, device,
                                                                    world_name=world_name)})
    model.load_state_dict(final)
    return records


def speedup(miro_evals, base_evals, metric):
    """Steps the baseline took to its final value of a metric, over the steps MIRO took to first
    reach it (paper Fig. 5); None if MIRO never reaches it."""
    target, base_steps = base_evals[-1]["eval"][metric], base_evals[-1]["step"]
    reached = [r["step"] for r in miro_evals if r["eval"][metric] >= target]
    return {"baseline_final": target, "baseline_steps": base_steps, "miro_steps": reached[0] if reached else None,
            "speedup": base_steps / reached[0] if reached else None}


def table(header, rows):
    """A markdown table: the header, its rule, one line per row (lists of cells)."""
    lines = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in lines]


def markdown_table(summary, metrics):
    """Rows = runs, columns = metrics, 'mean ± std over seeds'."""
    return "\n".join(table(["run", *metrics], [[run] + [f"{s['mean'][m]:.3f} ± {s['std'][m]:.3f}" for m in metrics]
                                                for run, s in summary.items()]))


def reward_ranges(out):
    """{reward: (1st, 99th percentile)} of the training images' scores, to place samples on."""
    path = os.path.join(out, "scores.pt")
    if not os.path.exists(path):
        return {}
    scores = world.load_pt(path, ["names", "scores"], STAGE, "02_score.py")
    return {name: tuple(np.nanpercentile(scores["scores"][:, i].numpy(), [1, 99]).tolist())
            for i, name in enumerate(scores["names"])}


def monotone(values):
    return all(b > a for a, b in zip(values, values[1:]))


def report(args):
    """Evaluate every run, draw the figures, write report.md and results.json. Everything is made in
    a staging folder and moved into OUT/eval/ at the end, so a failure leaves the last report whole."""
    device = world.resolve_device(args.device, STAGE)
    runs = find_runs(args.out, args.runs)
    final_dir = os.path.join(args.out, "eval")
    os.makedirs(final_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(args.out), ".eval.tmp*")):  # left by a killed 07
        pid = stale.rsplit("tmp", 1)[1]
        if not (pid.isdigit() and world.process_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    eval_dir = os.path.join(args.out, f".eval.tmp{os.getpid()}")
    os.makedirs(eval_dir)
    try:
        write_report(args, runs, device, eval_dir)
        for name in sorted(os.listdir(eval_dir), key=lambda n: n in ("report.md", "results.json")):
            os.replace(os.path.join(eval_dir, name), os.path.join(final_dir, name))  # the report last
    finally:
        shutil.rmtree(eval_dir, ignore_errors=True)
    print(f"wrote {final_dir}/report.md, results.json and the figures")


def write_report(args, runs, device, eval_dir):
    """The report's sections in order, each adding its lines to report.md and its numbers to results.json."""
    for run in runs:  # every run was trained by 05 (its log is there)
        read_log(args.out, run)
    models = {run: sampler.load_run(args.out, run, device=device, stage=STAGE) for run in runs}
    world_name = dataset_world(args.out)
    how = sampler.sampling_of(args)
    results = {"config": vars(args), "world": world_name, "runs": {}}
    summary, md = score_runs(args, models, how, world_name, device, eval_dir, results)
    names = {run: ckpt["reward_names"] for run, (_, ckpt) in models.items()}
    most = max(len(n) for n in names.values())
    miro = next((r for r in runs if most > 1 and len(names[r]) == most), None)  # the run with all rewards
    base = next((r for r in runs if not names[r]), None)
    if miro and base:
        md += miro_against_baseline(args, models, miro, base, summary, how, world_name, device, eval_dir, results)
    singles = [r for r in runs if len(names[r]) == 1 and r != miro]
    if miro and singles:
        md += reward_hacking(miro, singles, names, summary, results)
    if miro:
        md += dials(args, models[miro][0], names[miro], miro, how, world_name, device, eval_dir, results)
    world.save_together({os.path.join(eval_dir, "report.md"): "\n".join(md) + "\n",
                         os.path.join(eval_dir, "results.json"): json.dumps(results, indent=1) + "\n"})


def score_runs(args, models, how, world_name, device, eval_dir, results):
    """Every run at the top target over --seeds sampling seeds: the tables, the GenEval-style grids, the radar.
    Returns summary {run: {"mean", "std": {metric: float}}} and the report's first lines."""
    tasks, all_rewards = WORLD_TASKS[world_name], list(rewards.REWARDS)
    metrics = all_rewards + list(tasks) + ["overall"] + list(FACTS)
    summary = {}
    for run, (model, ckpt) in models.items():
        per_seed = [evaluate(model, ckpt["reward_names"], seed, how, args.per_task, args.captions, device, progress=True,
                             world_name=world_name,
                             grid_path=os.path.join(eval_dir, f"geneval_{run}.png") if seed == 0 else None)
                    for seed in range(args.seeds)]
        summary[run] = {"mean": {m: float(np.mean([r[m] for r in per_seed])) for m in metrics},
                        "std": {m: float(np.std([r[m] for r in per_seed])) for m in metrics}}
        results["runs"][run] = {"step": ckpt["step"], "rewards": ckpt["reward_names"], "seeds": per_seed, **summary[run],
                                "contrast_probe": contrast_probe(model, ckpt["reward_names"], device=device)}
        print(f"{run} (step {ckpt['step']}): " + ", ".join(f"{m} {summary[run]['mean'][m]:.3f}"
                                                          for m in all_rewards + ["overall"]))
    md = [f"# MIRO on the shapes world ({world_name})\n", f"Runs evaluated at w = {args.cfg}"
          f"{f' at t <= {args.cfg_max_t:g} only' if args.cfg_max_t < 1 else ''} ({args.neg_text} text in the negative "
          f"branch; text guidance for runs without rewards), {args.steps} {args.method.capitalize()} steps"
          f"{f', the network told t x {args.t_scale:g}' if args.t_scale < 1 else ''}, {args.seeds} sampling seeds "
          f"(mean ± std); reward means on {args.captions} fresh captions, GenEval-style scores on "
          f"{args.per_task} prompts per task.\n", markdown_table(summary, all_rewards + ["overall"]), "",
          markdown_table(summary, list(tasks)), "", "What the alignment reward found, fact by fact (stated_drawn: every "
          "stated colour+kind is there; exact_counts, relation: the stated ones that hold; nothing_else: no unstated "
          "object; objects: detected and stated per image; other_caption: the alignment reward against another "
          "caption, the chance level):\n", markdown_table(summary, list(FACTS)), "",
          "How much of an object does each run keep? Fresh one-object images noised to t: the share of the "
          "object's contrast the clean-image estimate keeps (1: all; below 1 every sampling step fades the object "
          "a little, and the fades multiply):\n",
          *table(["run", "caption", *(f"t = {t:g}" for t in PROBE_TS)],
                 [[run, label, *(f"{v:.3f}" for v in kept)] for run in models
                  for label, kept in results["runs"][run]["contrast_probe"].items()]), ""]
    ranges = reward_ranges(args.out)
    plot_radar(summary, all_rewards + ["overall"], ranges, os.path.join(eval_dir, "radar.png"))
    results["reward_ranges"] = ranges
    md += ["GenEval-style samples of sampling seed 0, a row per task (the first prompts of each):\n",
           *[f"{run}:\n\n![{run}](geneval_{run}.png)\n" for run in models]]
    md += ["![radar](radar.png)", "", "The radar places each reward between the 1st (0) and the 99th (1) percentile of "
           "the training images' scores; GenEval overall as it is.", ""]
    return summary, md


def miro_against_baseline(args, models, miro, base, summary, how, world_name, device, eval_dir, results):
    """Where MIRO leads by more than the seed spread, the convergence curves and speed-up (Fig. 5), best of N (Fig. 8)."""
    all_rewards = list(rewards.REWARDS)
    beats = {m: summary[miro]["mean"][m] - summary[base]["mean"][m]
             > summary[miro]["std"][m] + summary[base]["std"][m] for m in all_rewards + ["overall"]}
    results["miro_beats_baseline"] = beats
    md = [f"{miro} beats {base} by more than the seed spread on: "
          f"{', '.join(m for m, ok in beats.items() if ok) or 'nothing'}.", ""]
    evals = {run: snapshot_evals(args.out, run, models[run][0], models[run][1]["reward_names"], how,
                                 args.curve_per_task, args.curve_captions, world_name, device) for run in (miro, base)}
    if all(evals.values()):
        speed = {m: speedup(evals[miro], evals[base], m) for m in all_rewards + ["overall"]}
        results["speedup"] = speed
        plot_curves(evals, all_rewards + ["overall"], os.path.join(eval_dir, "curves.png"))
        md += ["## Convergence (paper Fig. 5)\n", *table(
            ["metric", "baseline final", "at step", "MIRO reaches it at step", "speedup"],
            [[m, f"{s['baseline_final']:.3f}", s["baseline_steps"], s["miro_steps"] or "never",
              f"{s['speedup']:.1f}x" if s["speedup"] else "-"] for m, s in speed.items()]),
               "", "![curves](curves.png)", ""]
    curves = {run: best_of_curve(models[run][0], models[run][1]["reward_names"], args.select, args.best_prompts,
                                 args.best_k, how, 0, device, world_name)
              for run in (miro, base)}
    results["best_of"] = {"select": args.select, "curves": curves}
    plot_xy(curves, "N (best of N)", f"best {args.select}", os.path.join(eval_dir, "best_of.png"), logx=True)
    return md + [f"## Best of N by {args.select} (paper Fig. 8)\n", *table(
        ["run", *(f"N={n}" for n in curves[miro])], [[run, *(f"{v:.3f}" for v in c.values())]
                                                    for run, c in curves.items()]),
                 "", "![best of N](best_of.png)", ""]


def reward_hacking(miro, singles, names, summary, results):
    """Each model that knows one reward against MIRO: its reward, and the alignment it pays for it."""
    results["single_reward"], rows = {}, []
    for run in singles:
        name = names[run][0]
        mine, theirs = summary[run]["mean"], summary[miro]["mean"]
        results["single_reward"][run] = {"reward": name, "on_it": [mine[name], theirs[name]],
                                         "alignment": [mine["alignment"], theirs["alignment"]]}
        rows.append([run, name, f"{mine[name]:.3f} / {theirs[name]:.3f}",
                     f"{mine['alignment']:.3f} / {theirs['alignment']:.3f}"])
    return ["## Single-reward models (reward hacking)\n", *table(
        ["run", "its reward", "on it: run / MIRO", "alignment: run / MIRO"], rows), ""]


def dials(args, model, names, miro, how, world_name, device, eval_dir, results):
    """MIRO's dials: one reward's target and w swept (Fig. 12), and each reward guided alone (Fig. 9)."""
    levels = np.linspace(0, 1, args.sweep_levels).tolist()
    common = (args.sweep_prompts, how, 0, device, world_name)
    by_level = dict(zip(levels, sweep(model, names, args.sweep, [(v, args.cfg) for v in levels], *common)))
    by_w = dict(zip(args.cfg_sweep, sweep(model, names, args.sweep, [(1.0, w) for w in args.cfg_sweep], *common)))
    results["sweep"] = {"reward": args.sweep, "target": by_level, "cfg": by_w,
                        "target_monotone": monotone(list(by_level.values())),
                        "cfg_monotone": monotone(list(by_w.values()))}
    plot_xy({f"{miro}: target of {args.sweep}": by_level}, f"s+ of {args.sweep}", args.sweep,
            os.path.join(eval_dir, "sweep.png"))
    plot_xy({f"{miro}: top target": by_w}, "guidance weight w", args.sweep, os.path.join(eval_dir, "cfg.png"))
    isolation_grid(model, names, args.grid_prompts, how, 0, device, os.path.join(eval_dir, "isolation.png"), world_name)
    return [f"## Dialling {args.sweep} (paper Fig. 12)\n",
            *table([f"s+ of {args.sweep}", *(f"{k:.2f}" for k in by_level)],
                   [[args.sweep, *(f"{v:.3f}" for v in by_level.values())]]), "",
            *table(["w", *(f"{k:g}" for k in by_w)], [[args.sweep, *(f"{v:.3f}" for v in by_w.values())]]), "",
            "![sweep](sweep.png) ![cfg](cfg.png)", "",
            "## Guiding one reward at a time (paper Fig. 9)\n", "The same noise in every row: all rewards at s+ = 1, "
            "then each reward guided up alone (only ...), then each guided down alone (... at 0).\n",
            "![isolation](isolation.png)", ""]


def dataset_world(out):
    """The shapes world of OUT's dataset (its fresh captions and the GenEval tasks it can draw);
    "full" for a folder of images or when captions.pt is absent."""
    path = os.path.join(out, "captions.pt")
    if not os.path.exists(path):
        return "full"
    return world.world_of(world.load_pt(path, ["source"], STAGE, "01_caption.py")) or "full"


def find_runs(out, spec):
    """--runs a,b,c, or every run with a checkpoint (MIRO first, then the baseline, then the rest)."""
    if spec:
        runs = spec.split(",")
    else:
        found = sorted(d for d in os.listdir(os.path.join(out, "runs")) if
                       os.path.exists(os.path.join(out, "runs", d, "ckpt.pt"))) if os.path.isdir(os.path.join(out, "runs")) else []
        runs = sorted(found, key=lambda r: (r != "miro", r != "baseline", r))
    if not runs:
        sys.exit(f"{STAGE}: error: no trained run in {out}/runs: train one with 05_train.py")
    return runs


# ============================================================================= diagnostics
# A probe the report prints beside the scores: why an object fades while it is sampled.
@torch.no_grad()
def contrast_probe(model, names, ts=PROBE_TS, n=64, device="cpu"):
    """How much of an object does the network keep? n fresh one-object images of the world, noised to each
    t, at the top reward target, captioned with their colour and kind ("a red circle.") and without the
    colour ("a circle."): the share of the object's contrast (its difference from the background) the
    clean-image estimate keeps, (x_hat - bg) . (x - bg) / |x - bg|^2, averaged. 1 keeps the object; below 1
    every sampling step fades it a little (an Euler step lands on x_s = (s/t) x_t + (1 - s/t) x_hat), and the
    fades multiply: an object drawn by mid-sampling can be gone at t = 0. {"named": [per t], "colour-free": [...]}"""
    images, captions = world.make_shapes(n, model.image_size, seed=PROBE_SEED, world="one", progress=False)
    x = world.to_signed(images)
    background = torch.tensor(world.BACKGROUND).float().view(1, 3, 1, 1) / 127.5 - 1
    kinds = [m["scene"]["objects"][0]["kind"] for m in captions["meta"]]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    levels = torch.ones(n, len(names), device=device)
    out = {}
    for label, prompts in (("named", captions["short"]), ("colour-free", [f"a {k}." for k in kinds])):
        tokens, mask = model.encode_text(net.tokenize(prompts, model.text_len, model.text_encoder).to(device))
        kept = []
        for t in ts:
            x_t = ((1 - t) * x + t * noise).to(device)
            v, _ = model.denoise(x_t, torch.full((n,), t, device=device), levels, tokens, mask)
            x_hat, obj = (x_t - t * v.float()).cpu() - background, x - background
            kept.append(float(((x_hat * obj).sum((1, 2, 3)) / obj.square().sum((1, 2, 3))).mean()))
        out[label] = kept
    return out


# ============================================================================= figures
# matplotlib drawing of the report's numbers (radar, curves, sweeps); nothing is computed here.
def plot_radar(summary, metrics, ranges, path):
    """Paper Fig. 4: one axis per metric, each reward placed on the range its training images
    span (0 = their 1st percentile, 1 = their 99th; ranges from scores.pt), GenEval as is."""
    angles = np.linspace(0, 2 * np.pi, len(metrics), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(5, 5), subplot_kw={"polar": True})
    for run, s in summary.items():
        row = []
        for m in metrics:
            if m not in ranges:  # GenEval, as it is
                row.append(s["mean"][m])
            elif ranges[m][1] > ranges[m][0]:
                row.append((s["mean"][m] - ranges[m][0]) / (ranges[m][1] - ranges[m][0]))
            else:  # a reward constant over the training images (a world without its degradation): no range
                row.append(1.0 if s["mean"][m] >= ranges[m][1] else 0.0)
        row = np.clip(row, 0, 1.2).tolist()
        ax.plot(angles + angles[:1], row + row[:1], label=run)
        ax.fill(angles + angles[:1], row + row[:1], alpha=0.1)
    ax.set_xticks(angles, metrics, fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0.5, 1.0], ["0.5", "1"], fontsize=7)
    ax.legend(loc="lower right", bbox_to_anchor=(1.2, -0.1), fontsize=8)
    save_figure(fig, path)


def plot_curves(evals, metrics, path):
    """Paper Fig. 5: each metric against training step, one line per run."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 2.8))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for run, records in evals.items():
            ax.plot([r["step"] for r in records], [r["eval"][metric] for r in records], marker=".", label=run)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    save_figure(fig, path)


def plot_xy(series, xlabel, ylabel, path, logx=False):
    """One line per entry of series {label: {x: y}}."""
    fig, ax = plt.subplots(figsize=(4, 3))
    for label, points in series.items():
        ax.plot(list(points), list(points.values()), marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ============================================================================= the command line
def main():
    parser = world.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--runs", help="comma-separated run names (default: every run with a checkpoint)")
    sampler.add_sampling_args(parser, steps=12, method="heun")  # --cfg, --cfg-max-t, --neg-text, --t-scale, ...
    parser.add_argument("--seeds", type=world.count, default=3, help="sampling seeds (the spread of every number)")
    parser.add_argument("--per-task", type=world.count, default=50, help="GenEval-style prompts per task")
    parser.add_argument("--captions", type=world.count, default=64, help="fresh captions for the reward means")
    parser.add_argument("--curve-per-task", type=world.count, default=10,
                        help="GenEval-style prompts per task for each training snapshot (the convergence curves)")
    parser.add_argument("--curve-captions", type=world.count, default=32, help="fresh captions for each snapshot")
    parser.add_argument("--select", default="alignment", help="the reward that picks the best of N")
    parser.add_argument("--best-k", type=world.natural, default=3, help="best of N for N = 1, 2, ..., 2^k")
    parser.add_argument("--best-prompts", type=world.count, default=12)
    parser.add_argument("--sweep", default="colourfulness", help="the reward whose target and w are swept")
    parser.add_argument("--sweep-levels", type=world.number(int, 2), default=4)
    parser.add_argument("--cfg-sweep", default="0,1,2,3", help="guidance weights of the w sweep")
    parser.add_argument("--sweep-prompts", type=world.count, default=24)
    parser.add_argument("--grid-prompts", type=world.count, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--geneval-prompts", action="store_true", help="print the GenEval prompt set and exit")
    args = parser.parse_args()
    if args.geneval_prompts:
        metas = geneval_prompts(args.per_task)
        for task in TASKS:
            prompts = [m["prompt"] for m in metas if m["tag"] == task]
            print(f"{task:>14} {len(prompts):4d} prompts ({len(set(prompts))} distinct), e.g. "
                  + " | ".join(prompts[:2]))
        return
    for name in (args.select, args.sweep):
        if name not in rewards.REWARDS:
            sys.exit(f"{STAGE}: error: unknown reward {name!r}; known: {', '.join(rewards.REWARDS)}")
    try:
        args.cfg_sweep = [world.finite(w) for w in args.cfg_sweep.split(",")]
    except argparse.ArgumentTypeError:
        sys.exit(f"{STAGE}: error: --cfg-sweep {args.cfg_sweep!r}: write finite weights like 0,1,2,3")
    world.resolve_device(args.device, STAGE)  # before any file is read
    report(args)


if __name__ == "__main__":
    main()
