"""The recipe learns: a regression test on the first rung of the ladder (01_caption.py --world one).

A short run of the main job's recipe (run.sh), with fixed seeds, must learn to draw one object of the named
colour and kind. A change that breaks learning (a wrong target, a lost conditioning path, a bad
default) fails here, where the known-answer tests of the parts can still pass."""
import numpy as np
import pytest

from conftest import run, stage

ev, sampler = stage("07_eval"), stage("06_sample")
STEPS = 400            # the main job's recipe at batch 16, a third of its steps on this world
COLORS_AT_LEAST = 0.8  # "a blue circle.": right colour and kind; chance is about 1 in 18, a lost caption scores 0.15 or less


@pytest.mark.slow
def test_the_recipe_learns_the_first_rung(tmp_path):
    run("01_caption.py", "--out", tmp_path, "--world", "one", "--n", 4000, "--seed", 1)
    run("02_score.py", "--out", tmp_path)
    run("03_bin.py", "--out", tmp_path)
    run("05_train.py", "--out", tmp_path, "--run", "baseline", "--rewards", "none", "--steps", STEPS,
        "--self-cond", 0, "--t-shift", 3, "--long-first", STEPS // 4, "--log-every", 100)  # as run.sh trains
    model, ckpt = sampler.load_run(tmp_path, "baseline")
    metas = ev.geneval_prompts(36, tasks=("colors",))  # each colour and kind twice
    images = sampler.generate(model, [m["prompt"] for m in metas], [[]] * len(metas), [[]] * len(metas),
                              seed=0, how=sampler.Sampling(cfg=1.0, steps=12, method="heun", cfg_max_t=0.7))  # as run.sh's report
    colors = ev.geneval(images, metas)["colors"]
    print(f"colors {colors:.3f} after {STEPS} steps")
    assert colors >= COLORS_AT_LEAST, f"after {STEPS} steps the baseline draws the named colour and kind " \
                                      f"{colors:.0%} of the time"
