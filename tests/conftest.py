"""Shared test helpers: import a stage by file name, run a stage as a user would."""
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs whole stages (skip with -m 'not slow')")


# Tests built on these fixtures run stages end to end: they are the slow tier. The fast tier,
# `pytest -m "not slow"`, keeps the known-answer and contract tests.
SLOW_FIXTURES = {"small_dataset", "two_runs", "torchrun"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def stage(name):
    """The module of a stage script, e.g. stage("02_score")."""
    return importlib.import_module(name)


def run(script, *args, check=True):
    """Run a stage script in a subprocess; returns the CompletedProcess (text output)."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Stages 01-03 on 2,000 scenes, run once for the whole session."""
    out = tmp_path_factory.mktemp("small")
    run("01_caption.py", "--out", out, "--n", 2000, "--seed", 3)
    run("02_score.py", "--out", out)
    run("03_bin.py", "--out", out)
    return out


@pytest.fixture(scope="session")
def two_runs(small_dataset, tmp_path_factory):
    """MIRO (all 4 rewards) and the baseline, 2 steps each on the small dataset, with an EMA
    snapshot after every step; shared by the sampling and evaluation tests."""
    out = tmp_path_factory.mktemp("runs")
    for name in ("images.npy", "captions.pt", "scores.pt", "bins.pt"):
        shutil.copy(small_dataset / name, out / name)
    fast = ["--steps", 2, "--batch-size", 8, "--warmup", 1, "--log-every", 1, "--eval-every", 1]
    run("05_train.py", "--out", out, "--run", "miro", *fast)
    run("05_train.py", "--out", out, "--run", "baseline", "--rewards", "none", *fast)
    return out


def fails_in_one_line(script, *args, expect):
    """Run a stage with bad input: it must exit non-zero with one stderr line holding every word of expect."""
    result = run(script, *map(str, args), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in expect:
        assert word in lines[0], (word, lines[0])
