"""07_eval.py: the convergence speed-up on known curves, the report end to end, bad input."""
import json
import os
import shutil

import numpy as np
import torch
import pytest

from conftest import ROOT, fails_in_one_line, run, stage

ev = stage("07_eval")


def records(values, every=100):
    return [{"step": every * (i + 1), "eval": {"sharpness": v}} for i, v in enumerate(values)]


def test_speedup_is_the_step_ratio_at_the_baselines_final_value():
    base = records([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])           # final 0.6 at step 600
    miro = records([0.3, 0.65, 0.7, 0.7, 0.8, 0.8])          # first >= 0.6 at step 200
    s = ev.speedup(miro, base, "sharpness")
    assert (s["baseline_final"], s["baseline_steps"], s["miro_steps"], s["speedup"]) == (0.6, 600, 200, 3.0)
    assert ev.speedup(records([0.1] * 6), base, "sharpness")["speedup"] is None  # never reached


def test_radar_places_a_constant_reward_without_dividing_by_zero(tmp_path):
    """On a world without a degradation a reward can be the same for every training image: its
    range is a point, and a run is drawn at 1 when it reaches it."""
    summary = {"run": {"mean": {"low_noise": 0.0, "sharpness": 0.5, "overall": 0.4}}}
    with np.errstate(all="raise"):
        ev.plot_radar(summary, ["low_noise", "sharpness", "overall"], {"low_noise": (0.0, 0.0),
                      "sharpness": (0.0, 1.0)}, str(tmp_path / "radar.png"))
    assert (tmp_path / "radar.png").exists()


def test_monotone_is_strict():
    assert ev.monotone([0.1, 0.2, 0.25, 0.9]) and not ev.monotone([0.1, 0.2, 0.2, 0.3])


@pytest.fixture(scope="module")
def runs(two_runs):
    return two_runs


def test_training_snapshots_are_evaluated_by_07(runs):
    """05 saves EMA snapshots (--eval-every) and 07 evaluates them: reward against step, with no
    later stage imported by 05."""
    model, ckpt = ev.sampler.load_run(runs, "miro")
    how = ev.sampler.Sampling(cfg=1.0, steps=2, method="heun")
    evals = ev.snapshot_evals(runs, "miro", model, ckpt["reward_names"], how, 1, 2, "full", "cpu")
    assert [r["step"] for r in evals] == [1, 2]
    assert set(ev.rewards.REWARDS) | set(ev.TASKS) | {"overall"} <= set(evals[0]["eval"])
    assert 'import_module("07_eval")' not in (ROOT / "05_train.py").read_text()


def test_report_end_to_end(runs):
    run("05_train.py", "--out", runs, "--run", "colourfulness", "--rewards", "colourfulness", "--steps", 1,
        "--batch-size", 8, "--warmup", 1, "--eval-every", 1)
    run("07_eval.py", "--out", runs, "--steps", 2, "--seeds", 2, "--per-task", 2, "--captions", 4,
        "--curve-per-task", 1, "--curve-captions", 2,
        "--best-prompts", 2, "--best-k", 1, "--sweep-prompts", 2, "--sweep-levels", 4, "--cfg-sweep", "0,1,2,3",
        "--grid-prompts", 2)
    eval_dir = runs / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    assert list(results["runs"]) == ["miro", "baseline", "colourfulness"]
    single = results["single_reward"]["colourfulness"]
    assert single["reward"] == "colourfulness" and len(single["on_it"]) == 2 and len(single["alignment"]) == 2
    assert set(results["reward_ranges"]) == set(ev.rewards.REWARDS)
    miro = results["runs"]["miro"]
    assert len(miro["seeds"]) == 2 and set(ev.TASKS) <= set(miro["mean"]) and "overall" in miro["std"]
    assert set(results["miro_beats_baseline"]) == set(ev.rewards.REWARDS) | {"overall"}
    assert results["speedup"]["sharpness"]["baseline_steps"] == 2
    assert list(results["best_of"]["curves"]["miro"]) == ["1", "2"]
    assert len(results["sweep"]["target"]) == 4 and len(results["sweep"]["cfg"]) == 4
    report = (eval_dir / "report.md").read_text()
    for figure in ("radar", "curves", "best_of", "sweep", "cfg", "isolation", "geneval_miro", "geneval_baseline"):
        assert (eval_dir / f"{figure}.png").exists() and f"({figure}.png)" in report
    assert "| miro |" in report and "| baseline |" in report and "reward hacking" in report
    assert "How much of an object" in report and len(miro["contrast_probe"]["colour-free"]) == len(ev.PROBE_TS)


def test_a_failed_report_leaves_the_last_one_whole(runs, tmp_path):
    """07 makes the report, results and figures in a staging folder and moves them into eval/ at
    the end: a failure half way (here an unreadable snapshot, after the first figures) leaves the
    earlier report, results and figures byte for byte, and no staging folder."""
    broken = tmp_path / "broken"
    shutil.copytree(runs, broken, copy_function=os.symlink)  # links: the checkpoints are large
    shutil.rmtree(broken / "eval", ignore_errors=True)
    (broken / "eval").mkdir()
    for name in ("report.md", "results.json", "radar.png"):
        (broken / "eval" / name).write_text(f"the last good {name}")
    snapshot = sorted((broken / "runs" / "miro" / "snapshots").glob("*.pt"))[0]
    snapshot.unlink()
    snapshot.write_bytes(b"cut short")
    before = {p.name: p.read_bytes() for p in (broken / "eval").iterdir()}
    result = run("07_eval.py", "--out", broken, "--runs", "miro,baseline", "--steps", 1, "--seeds", 1,
                 "--per-task", 1, "--captions", 2, check=False)  # stderr also holds the progress bars
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr and "snapshots" in last and "unreadable" in last
    assert {p.name: p.read_bytes() for p in (broken / "eval").iterdir()} == before
    assert not list(broken.glob(".eval.tmp*"))


def test_bad_input_fails_in_one_line(runs, tmp_path):
    nolog = tmp_path / "nolog"
    shutil.copytree(runs, nolog, copy_function=os.symlink)  # links: the checkpoints are large
    (nolog / "runs" / "baseline" / "log.jsonl").unlink()
    fails_in_one_line("07_eval.py", "--out", nolog, "--runs", "miro,baseline",
                      expect=["baseline", "no log", "05_train.py"])
    fails_in_one_line("07_eval.py", "--out", runs, "--select", "aesthetic", expect=["unknown reward", "aesthetic"])
    fails_in_one_line("07_eval.py", "--out", tmp_path, expect=["no trained run", "05_train.py"])


def test_contrast_probe_reads_how_much_of_an_object_a_network_keeps():
    """Known answers: a network whose clean-image estimate is the background alone keeps 0 of every
    object; one that hands back its input's image (x_t / (1 - t)) at half the contrast keeps 0.5 (its
    noise averages out over the probe's images)."""
    net = stage("04_model")
    model, _ = net.build("tiny", 0)
    background = torch.tensor(ev.world.BACKGROUND).float().view(1, 3, 1, 1) / 127.5 - 1

    def nothing(x_t, t, levels, tokens, mask, prev=None):  # v such that x_hat = x_t - t v = background
        return (x_t - background) / t.view(-1, 1, 1, 1), None

    def half(x_t, t, levels, tokens, mask, prev=None):     # x_hat = background + (x_t / (1 - t) - background) / 2
        t = t.view(-1, 1, 1, 1)
        return (x_t - background - (x_t / (1 - t) - background) / 2) / t, None
    model.denoise = nothing
    kept = ev.contrast_probe(model, [])
    assert set(kept) == {"named", "colour-free"} and np.allclose(kept["named"] + kept["colour-free"], 0, atol=1e-5)
    model.denoise = half
    kept = ev.contrast_probe(model, [])
    assert np.allclose(kept["named"], 0.5, atol=0.05) and kept["named"] == kept["colour-free"], kept