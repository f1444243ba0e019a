"""05_train.py end to end in a temporary folder: checkpoint contract, exact resume, DDP, bad input."""
import argparse
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run, stage

net = stage("04_model")
train = stage("05_train")
FAST = ["--batch-size", 8, "--log-every", 1, "--warmup", 2]


@pytest.fixture(scope="module")
def data(small_dataset, tmp_path_factory):
    """A private copy of the 2,000-image dataset, so runs here never touch other tests' files."""
    out = tmp_path_factory.mktemp("train")
    for name in ("images.npy", "captions.pt", "bins.pt"):
        shutil.copy(small_dataset / name, out / name)
    return out


def log_of(out, name):
    return [json.loads(line) for line in (out / "runs" / name / "log.jsonl").read_text().splitlines()]


def ckpt_of(out, name):
    return torch.load(out / "runs" / name / "ckpt.pt", weights_only=True)


def test_checkpoint_and_log_follow_the_contract(data):
    result = run("05_train.py", "--out", data, "--run", "contract", "--steps", 3, "--captions", "short", *FAST)
    assert "img/s" in result.stdout and "MFU" in result.stdout
    ckpt = ckpt_of(data, "contract")
    for key in ("model", "ema", "optimizer", "step", "model_args", "reward_names", "num_bins", "bin_edges",
                "version", "config"):
        assert key in ckpt, key
    assert ckpt["step"] == 3 and ckpt["reward_names"] == ["alignment", "sharpness", "low_noise", "colourfulness"]
    assert ckpt["bin_edges"].shape == (4, ckpt["num_bins"] + 1)
    model = net.TextRIN(**ckpt["model_args"])  # the checkpoint alone rebuilds the network
    model.load_state_dict(ckpt["model"])
    model.load_state_dict(ckpt["ema"])
    log = log_of(data, "contract")
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        assert {"loss", "lr", "grad_norm", "images_per_s", "mfu", "loss_by_t"} <= set(record)
        assert record["loss"] > 0


def test_baseline_and_single_reward_runs_are_the_same_script(data):
    run("05_train.py", "--out", data, "--run", "base", "--rewards", "none", "--steps", 1, *FAST)
    run("05_train.py", "--out", data, "--run", "only", "--rewards", "colourfulness", "--steps", 1, *FAST)
    base, only = ckpt_of(data, "base"), ckpt_of(data, "only")
    assert base["model_args"]["num_rewards"] == 0 and base["reward_names"] == []
    assert not any("reward" in key for key in base["model"])
    assert only["reward_names"] == ["colourfulness"] and only["model"]["reward_id"].shape[0] == 1


def test_resume_is_bit_exact(data):
    run("05_train.py", "--out", data, "--run", "straight", "--steps", 6, *FAST)
    run("05_train.py", "--out", data, "--run", "split", "--steps", 6, "--stop-at", 3, *FAST)
    assert ckpt_of(data, "split")["step"] == 3
    run("05_train.py", "--out", data, "--run", "split", "--steps", 6, "--resume", *FAST)
    straight, split = ckpt_of(data, "straight"), ckpt_of(data, "split")
    assert split["step"] == 6
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(value, split[part][key]), (part, key)
    for key, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], split["optimizer"]["state"][key]["exp_avg_sq"])
    assert [r["loss"] for r in log_of(data, "straight")] == [r["loss"] for r in log_of(data, "split")]


def test_torchrun_two_ranks_hold_identical_parameters(data):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "05_train.py"), "--out", str(data), "--run-name", "ddp", "--steps", "3",
               *map(str, FAST)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(data, "ddp")
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        first, second = record["param_checksums"]
        assert first == second, record
    assert "2 x cpu" in result.stdout


def fails_in_one_line(*args, expect, untouched=()):
    before = {path: path.read_bytes() for path in untouched}
    result = run("05_train.py", *args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    for word in expect:
        assert word in lines[0], (word, lines[0])
    for path, content in before.items():
        assert path.read_bytes() == content, path
    return lines[0]


def test_bad_input_gives_one_clear_line(data, tmp_path):
    fails_in_one_line("--out", data, "--preset", "huge", expect=["unknown preset huge", "tiny"])
    fails_in_one_line("--out", data, "--rewards", "alignment,beauty", expect=["unknown reward beauty", "alignment"])
    fails_in_one_line("--out", data, "--run", "never", "--resume", expect=["--resume", "no checkpoint"])
    fails_in_one_line("--out", data, "--relation-steps", 5, "--captions", "long,brief",
                      expect=["--relation-steps", "short captions"])
    # bins.pt of another dataset: other N, then the same N with other captions
    other = tmp_path / "other"
    for seed in (1, 2):
        run("01_caption.py", "--out", other / str(seed), "--n", 60, "--seed", seed)
        run("02_score.py", "--out", other / str(seed))
        run("03_bin.py", "--out", other / str(seed))
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed, ignore=shutil.ignore_patterns("runs"))
    shutil.copy(other / "1" / "bins.pt", mixed / "bins.pt")
    fails_in_one_line("--out", mixed, expect=["another dataset", "60 images", "03_bin.py"])
    shutil.copy(other / "1" / "bins.pt", other / "2" / "bins.pt")
    fails_in_one_line("--out", other / "2", expect=["another dataset", "fingerprint", "02_score.py"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data):
    args = ["--out", data, "--run", "blowup", "--steps", 5, "--lr", 1e30, "--warmup", 1, "--ckpt-every", 1,
            "--batch-size", 8]
    line = fails_in_one_line(*args, expect=["non-finite loss", "at step 2", "keeps step 1"])
    assert "ckpt.pt" in line
    ckpt = ckpt_of(data, "blowup")
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_benchmark_flag_prints_a_table():
    out = run("05_train.py", "--benchmark", "--bench-steps", 1, "--batch-size", 2).stdout
    row = next(line for line in out.splitlines() if line.split()[:2] == ["tiny", "TextRIN"])
    assert float(row.split()[-2]) > 0  # img/s


def test_official_network_runs_behind_the_same_call():
    pytest.importorskip("miro.models.networks.rin")
    model_args = dict(net.PRESETS["tiny"], num_rewards=3)
    x_t, t, levels, ids = net.dummy_inputs(model_args, 2)
    v, latents = train.OfficialNetwork(model_args)(x_t, t, levels, ids)
    assert v.shape == x_t.shape and latents.shape[:2] == (2, model_args["num_latents"])


def test_network_settings_and_caption_kinds_are_flags(data):
    """--net replaces preset settings (recorded in the checkpoint, so 06/07 rebuild the same network);
    --captions lists the kinds shown, a kind listed twice shown twice as often."""
    run("05_train.py", "--out", data, "--run", "net", "--steps", 1, "--rewards", "none",
        "--net", "patch_cond=true,cell_codes=random", "--captions", "short,brief,brief", *FAST)
    ckpt = ckpt_of(data, "net")
    assert ckpt["model_args"]["patch_cond"] is True and ckpt["model_args"]["cell_codes"] == "random"
    assert any(key.startswith("blocks.0.patch_cond.") for key in ckpt["model"])
    assert train.net_overrides("patch_size=8,sigma_data=0.4,prediction=v") == {
        "patch_size": 8, "sigma_data": 0.4, "prediction": "v"}
    for bad, words in ((["--net", "depth=3"], ["--net", "depth=3", "patch_cond"]),
                       (["--net", "pixel_skip=grey"], ["--net", "pixel_skip", "true or false"]),
                       (["--net", "cell_codes=grid"], ["--net", "cell_codes", "'grid'"]),
                       (["--captions", "short,poem"], ["--captions", "poem"])):
        result = run("05_train.py", "--out", data, "--run", "bad", "--steps", 1, *bad, *FAST, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
        assert not (data / "runs" / "bad").exists()  # nothing written


def test_non_finite_weights_after_a_finite_loss_stop_the_run(data):
    """A rate that overflows float32 in the update: the loss of step 1 is finite, its update is not.
    The run stops before it writes NaN weights."""
    args = ["--out", data, "--run", "overflow", "--steps", 3, "--lr", 1e39, "--warmup", 1, "--ckpt-every", 1,
            "--batch-size", 8]
    fails_in_one_line(*args, expect=["non-finite weights after step 1", "no checkpoint was written"])
    assert not (data / "runs" / "overflow" / "ckpt.pt").exists()


def test_a_crash_mid_write_leaves_nothing_that_breaks_a_resume(data):
    run("05_train.py", "--out", data, "--run", "cut", "--steps", 2, *FAST)
    log = data / "runs" / "cut" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # a crash in the middle of a write
    stale = data / "runs" / "cut" / "ckpt.pt.tmp4242"  # and a save a killed process left behind
    stale.write_bytes(b"half a checkpoint")
    result = run("05_train.py", "--out", data, "--run", "cut", "--steps", 3, "--resume", *FAST)
    assert "skipped 1 unreadable line" in result.stderr
    assert [r["step"] for r in log_of(data, "cut")] == [1, 2, 3] and not stale.exists()


def test_a_run_is_never_lost_or_mixed(data):
    """An existing run is not trained over without --resume or --overwrite; --resume refuses what
    would change the run (fewer steps, another preset, other bins, another dataset), each in one line,
    and leaves its files as they were."""
    run("05_train.py", "--out", data, "--run", "keep", "--steps", 2, "--eval-every", 1, *FAST)
    files = [data / "runs" / "keep" / name for name in ("ckpt.pt", "log.jsonl")]
    fails_in_one_line("--out", data, "--run", "keep", "--steps", 2, *FAST, untouched=files,
                      expect=["run keep exists", "--resume", "--overwrite"])
    fails_in_one_line("--out", data, "--run", "keep", "--steps", 1, "--resume", *FAST, untouched=files,
                      expect=["step 2", "past --steps 1"])
    ckpt = ckpt_of(data, "keep")
    bins = torch.load(data / "bins.pt", weights_only=True)
    three = {**bins, "num_bins": 3}
    moved = {**bins, "edges": bins["edges"] + 0.01}
    other = {**bins, "dataset": "0123456789abcdef"}
    for check, words in [(lambda: train.check_resume(ckpt, argparse.Namespace(preset="small", steps=3)),
                          ["--preset tiny", "not small"]),
                         (lambda: train.check_resume_data(ckpt, three), ["5 bins", "bins.pt has 3", "03_bin.py --bins 5"]),
                         (lambda: train.check_resume_data(ckpt, moved), ["other bin edges"]),
                         (lambda: train.check_resume_data(ckpt, other), ["another dataset"])]:
        with pytest.raises(SystemExit) as stop:  # the same one-line exit as above, without a process each
            check()
        assert all(word in str(stop.value) for word in words) and "\n" not in str(stop.value), stop.value
    train.check_resume_data(ckpt, bins)  # the run's own bins pass
    # --overwrite starts afresh: a new log, and the earlier run's snapshots are gone
    run("05_train.py", "--out", data, "--run", "keep", "--steps", 1, "--overwrite", *FAST)
    assert [r["step"] for r in log_of(data, "keep")] == [1] and ckpt_of(data, "keep")["step"] == 1
    assert not list((data / "runs" / "keep" / "snapshots").glob("*.pt"))
    assert not (data / "runs" / "keep" / "lock").exists()


def test_two_trainings_of_one_run_the_second_refuses(data):
    """One process owns a run (a lock file with its pid); a second refuses in one line. A killed
    owner does not leave the run stuck: its lock is taken over, and the resumed run equals an
    uninterrupted one bit for bit."""
    args = ["--out", data, "--run", "owned", "--steps", 400, "--ckpt-every", 2, *FAST]
    first = subprocess.Popen([sys.executable, str(ROOT / "05_train.py"), *map(str, args)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ckpt = data / "runs" / "owned" / "ckpt.pt"
        for _ in range(600):  # the first run is training once its first checkpoint is there
            if ckpt.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        fails_in_one_line(*args, "--resume", expect=["run owned is being trained by process", str(first.pid)])
    finally:
        first.kill()  # kill -9: the lock stays behind, its process gone
        first.wait()
    assert (data / "runs" / "owned" / "lock").exists()
    step = ckpt_of(data, "owned")["step"]
    run("05_train.py", *args, "--stop-at", step + 2, "--resume")
    run("05_train.py", "--out", data, "--run", "whole", "--steps", 400, "--stop-at", step + 2, *FAST)
    owned, whole = ckpt_of(data, "owned"), ckpt_of(data, "whole")
    for part in ("model", "ema"):
        for key, value in whole[part].items():
            assert torch.equal(value, owned[part][key]), (part, key)
    assert not list((data / "runs" / "owned").glob("ckpt.pt.tmp*")) and not (data / "runs" / "owned" / "lock").exists()


def test_t_shift_moves_the_median_towards_noise():
    """SD3's shift t -> s t / (1 + (s - 1) t): the median 0.5 of uniform t goes to s / (1 + s)."""
    generator = torch.Generator().manual_seed(0)
    for dist in ("uniform", "logit-normal"):
        for shift, median in ((1.0, 0.5), (3.0, 0.75)):
            t = train.sample_t(20_000, dist, generator, "cpu", shift)
            assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - median) < 0.02


def test_text_lr_moves_only_the_text_encoder_further():
    """--text-lr 5: one step of the same gradient moves the own text encoder's weights 5 times as far
    (Adam's first step is lr * sign of the gradient) and every other weight as far as before."""
    model, _ = net.build("tiny", 0, num_blocks=1, text_layers=1)
    x, t, levels, ids = net.dummy_inputs(dict(net.PRESETS["tiny"], num_blocks=1, text_layers=1, num_rewards=0), 2)
    moved = {}
    for scale in (1.0, 5.0):
        copy, _ = net.build("tiny", 0, num_blocks=1, text_layers=1)
        copy.load_state_dict(model.state_dict())
        args = argparse.Namespace(lr=1e-3, weight_decay=0.0, text_lr=scale)
        optimizer = train.make_optimizer(copy, args, torch.device("cpu"))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * group["lr_scale"]
        copy(x, t, levels, ids)[0].square().mean().backward()
        optimizer.step()
        moved[scale] = {name: (p - model.state_dict()[name]).abs().max().item() for name, p in copy.named_parameters()}
    text = [name for name in moved[1.0] if name.startswith("text.") and moved[1.0][name] > 0]
    other = [name for name in moved[1.0] if not name.startswith("text.") and moved[1.0][name] > 0]
    assert text and other
    for name in text:
        assert moved[5.0][name] == pytest.approx(5 * moved[1.0][name], rel=1e-3), name
    for name in other:
        assert moved[5.0][name] == pytest.approx(moved[1.0][name], rel=1e-3), name


def test_relation_and_count_steps_draw_from_the_scenes_they_name(data):
    """--relation-objects N: the relation steps draw from the scenes with a relation and at most N objects;
    --count-steps from the scenes of several objects of one kind."""
    captions = torch.load(data / "captions.pt", weights_only=False)
    scenes = [m["scene"] for m in captions["meta"]]
    every, two = (train.load_data(data, "none", "mix", 64, "own", n)[-2].tolist() for n in (4, 2))
    assert every == [i for i, s in enumerate(scenes) if s["relation"]]
    assert two == [i for i in every if len(scenes[i]["objects"]) == 2] and 0 < len(two) < len(every)
    count = train.load_data(data, "none", "mix", 64, "own")[-1].tolist()  # --count-steps: several of one kind
    assert count == [i for i, s in enumerate(scenes) if len(s["objects"]) > 1 and len({o["kind"] for o in s["objects"]}) == 1]
    assert count
