"""Stages 01-03 end to end in a temporary folder: the file contract of design.md,
same seed same bytes, and one clear line for every kind of bad input."""
import hashlib
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import run, stage

FILES = ["images.npy", "captions.pt", "scores.pt", "bins.pt"]


def test_files_match_the_contract(small_dataset):
    images = np.load(small_dataset / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (2000, 32, 32, 3)
    N = len(images)
    captions = torch.load(small_dataset / "captions.pt", weights_only=True)
    scores = torch.load(small_dataset / "scores.pt", weights_only=True)
    bins = torch.load(small_dataset / "bins.pt", weights_only=True)
    for data in (captions, scores, bins):
        assert isinstance(data["version"], int) and isinstance(data["config"], dict)
    assert captions["source"] == "shapes" and captions["config"]["seed"] == 3
    for key in ("alt", "long", "short", "meta"):
        assert len(captions[key]) == N
    assert all(isinstance(c, str) and c for key in ("long", "short") for c in captions[key])
    assert {"scene", "degradations"} <= set(captions["meta"][0])
    assert scores["names"] == ["alignment", "sharpness", "low_noise", "colourfulness"]
    assert scores["scores"].dtype == torch.float32 and scores["scores"].shape == (N, 4)
    B = bins["num_bins"]
    assert bins["names"] == scores["names"] and B == 5
    assert bins["edges"].shape == (4, B + 1) and bins["edges"].is_floating_point()
    assert bins["bins"].dtype == torch.int64 and bins["bins"].shape == (N, 4)
    assert bins["bins"].min() >= 0 and bins["bins"].max() == B - 1
    assert bins["calib_idx"].tolist() == list(range(N))  # default calibration subset: everything
    for r in (1, 2, 3):  # continuous rewards: equal populations
        populations = torch.bincount(bins["bins"][:, r], minlength=B)
        assert (populations - N / B).abs().max() <= 0.02 * N / B, populations
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(small_dataset))


def digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


def test_same_seed_same_bytes(small_dataset, tmp_path):
    again = tmp_path / "again"
    run("01_caption.py", "--out", again, "--n", 2000, "--seed", 3)
    run("02_score.py", "--out", again)
    run("03_bin.py", "--out", again)
    assert digest(again) == digest(small_dataset)


@pytest.mark.slow
def test_rewards_are_not_all_the_same_signal_on_the_default_dataset(tmp_path):
    """The default dataset (20,000 scenes): no pair of rewards has |Spearman| above 0.9."""
    run("01_caption.py", "--out", tmp_path)
    run("02_score.py", "--out", tmp_path)
    printed = run("03_bin.py", "--out", tmp_path).stdout
    binning = __import__("conftest").stage("03_bin")
    matrix = binning.spearman(torch.load(tmp_path / "scores.pt", weights_only=True)["scores"].numpy())
    off_diagonal = np.abs(matrix[~np.eye(len(matrix), dtype=bool)])
    assert off_diagonal.max() < 0.9, matrix
    assert "Spearman" in printed and "images per bin" in printed


@pytest.mark.slow
def test_folder_source(tmp_path):
    from PIL import Image
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (60, 40), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(folder / "sub" / "b.jpg")
    (folder / "sub" / "b.txt").write_text("a blue photo\n")
    (folder / "broken.webp").write_bytes(b"not an image")
    (tmp_path / "alt.json").write_text('{"a.png": "red  square"}')
    out = tmp_path / "out"
    result = run("01_caption.py", "--source", "folder", "--images", folder, "--captioner", "none",
                 "--alt-file", tmp_path / "alt.json",
                 "--out", out)
    assert "skipped 1 unreadable" in result.stdout
    result = run("01_caption.py", "--source", "folder", "--images", folder, "--captioner", "none", "--out", out)
    assert "1 of 2 image(s) have no alt text" in result.stdout  # a.png's text was in alt.json only
    result = run("01_caption.py", "--source", "folder", "--images", folder, "--captioner", "none",
                 "--alt-file", tmp_path / "alt.json", "--out", out)
    images = np.load(out / "images.npy")
    captions = torch.load(out / "captions.pt", weights_only=True)
    assert images.shape == (2, 32, 32, 3) and captions["source"] == "folder"
    assert captions["alt"] == ["red square", "a blue photo"] and captions["long"] == captions["alt"]
    assert [m["file"] for m in captions["meta"]] == ["a.png", os.path.join("sub", "b.jpg")]
    assert tuple(images[0, 16, 16]) == (255, 0, 0)


def test_folder_images_of_every_mode_come_out_8_bit(tmp_path):
    """A 16-bit PNG is scaled to 8 bits, not clipped to white; transparency is laid over white."""
    from PIL import Image
    world = stage("01_caption")
    grey16 = np.full((8, 8), 32768, np.uint16)  # half of 16-bit white
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert np.asarray(Image.open(tmp_path / "grey16.png")).dtype == np.uint16  # really 16 bits on disk
    assert np.abs(np.asarray(world.read_square(tmp_path / "grey16.png", 4)).astype(int) - 128).max() <= 1
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(world.read_square(tmp_path / "clear.png", 4)).min() == 255


@pytest.mark.parametrize("name,content,words", [
    ("missing.json", None, ["no such file"]),
    ("latin1.tsv", "caf\xe9.png\tcaf\xe9".encode("latin-1"), ["not UTF-8"]),
    ("bad.json", b'{"a.png": ', ["not valid JSON"]),
    ("list.json", b'["a.png"]', ["JSON list", "not an object"]),
])
def test_every_alt_file_problem_is_one_line(tmp_path, name, content, words):
    world = stage("01_caption")
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as stop:  # 01 reads --alt-file before it reads any image
        world.read_alt_file(str(tmp_path / name))
    message = str(stop.value)
    assert "\n" not in message and all(word in message for word in ["--alt-file", *words]), message


def test_a_bad_alt_file_stops_01_before_it_writes(tmp_path):
    from PIL import Image
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (tmp_path / "list.json").write_text('["a.png"]')
    fails_cleanly("01_caption.py", "--out", tmp_path / "out", "--source", "folder", "--images", folder,
                  "--captioner", "none", "--alt-file", tmp_path / "list.json", expect=["--alt-file", "not an object"])
    assert not (tmp_path / "out" / "images.npy").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def work(small_dataset, tmp_path):
    """A private copy of the small dataset to break."""
    folder = tmp_path / "work"
    shutil.copytree(small_dataset, folder)
    return folder


def fails_cleanly(script, *args, expect, untouched=None):
    """The stage exits non-zero with one line naming the problem, and leaves files as they were."""
    before = {p: p.read_bytes() for p in untouched or []}
    result = run(script, *args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    for word in expect:
        assert word in lines[0], lines[0]
    for path, content in before.items():
        assert path.read_bytes() == content
    return lines[0]


@pytest.mark.slow
def test_missing_inputs(tmp_path):
    fails_cleanly("02_score.py", "--out", tmp_path, expect=["images.npy", "missing", "01_caption.py"])
    fails_cleanly("03_bin.py", "--out", tmp_path, expect=["scores.pt", "missing", "02_score.py"])


def test_corrupt_inputs(work):
    (work / "captions.pt").write_bytes(b"garbage")
    fails_cleanly("02_score.py", "--out", work, expect=["captions.pt", "01_caption.py"], untouched=[work / "scores.pt"])
    (work / "images.npy").write_bytes(b"garbage")
    fails_cleanly("02_score.py", "--out", work, expect=["images.npy", "01_caption.py"], untouched=[work / "scores.pt"])
    (work / "scores.pt").write_bytes(b"\x00" * 10)
    fails_cleanly("03_bin.py", "--out", work, expect=["scores.pt", "02_score.py"], untouched=[work / "bins.pt"])


def test_n_differs_between_files(work, tmp_path):
    other = tmp_path / "other"
    run("01_caption.py", "--out", other, "--n", 50)
    shutil.copy(other / "captions.pt", work / "captions.pt")
    fails_cleanly("02_score.py", "--out", work, expect=["2000", "50", "01_caption.py"], untouched=[work / "scores.pt"])
    shutil.copy(other / "images.npy", work / "images.npy")  # images now 50, scores.pt still 2000
    fails_cleanly("03_bin.py", "--out", work, expect=["2000", "50", "02_score.py"], untouched=[work / "bins.pt"])


def test_a_set_of_files_is_written_whole_or_not_at_all(work, tmp_path, monkeypatch):
    """01 writes images.npy and captions.pt together: a failure on the second leaves both as they
    were, and no temporary file. A mixed set (images of another run under the same N) is caught by
    the next stage through the images' fingerprint that captions.pt records."""
    world = stage("01_caption")
    images, captions = work / "images.npy", work / "captions.pt"
    before = {p: p.read_bytes() for p in (images, captions)}
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        raise OSError("no space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        world.save_together({images: np.zeros((3, 32, 32, 3), np.uint8), captions: {"alt": []}})
    monkeypatch.setattr(torch, "save", real_save)
    assert all(p.read_bytes() == content for p, content in before.items())
    assert sorted(os.listdir(work)) == sorted(FILES + ["world.png"])
    other = tmp_path / "other"
    run("01_caption.py", "--out", other, "--n", 2000, "--seed", 11)
    shutil.copy(other / "images.npy", work / "images.npy")  # same N, other images
    fails_cleanly("02_score.py", "--out", work, expect=["other images", "01_caption.py"], untouched=[work / "scores.pt"])
    fails_cleanly("05_train.py", "--out", work, "--steps", 1, expect=["other images", "01_caption.py"])
    assert not (work / "runs").exists()


def test_a_reward_that_fails_everywhere_names_its_cause(tmp_path):
    """Captions that are not strings: the alignment reward raises on every image. 02 says so, with
    the error, and writes nothing (it does not hand 03 a column of NaN)."""
    run("01_caption.py", "--out", tmp_path, "--n", 40)
    captions = torch.load(tmp_path / "captions.pt", weights_only=True)
    captions["short"] = list(range(len(captions["short"])))
    torch.save(captions, tmp_path / "captions.pt")
    result = run("02_score.py", "--out", tmp_path, "--rewards", "alignment,sharpness", check=False)
    last = result.stderr.strip().splitlines()[-1]  # after the progress bars
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    for words in ("reward alignment has no score on any image", "AttributeError", "01_caption.py"):
        assert words in last, last
    assert not (tmp_path / "scores.pt").exists()


def test_unknown_reward_and_bad_flags(work):
    fails_cleanly("02_score.py", "--out", work, "--rewards", "alignment,beauty", expect=["beauty", "known"],
                  untouched=[work / "scores.pt"])
    fails_cleanly("03_bin.py", "--out", work, "--bins", 1, expect=["--bins", "2"], untouched=[work / "bins.pt"])
    fails_cleanly("01_caption.py", "--out", work, "--size", 30, expect=["--size"], untouched=[work / "images.npy"])


@pytest.mark.slow
def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for script in ("01_caption.py", "02_score.py", "03_bin.py"):
        fails_cleanly(script, "--out", blocker / "sub", "--n" if script == "01_caption.py" else "--out",
                      10 if script == "01_caption.py" else blocker / "sub", expect=["cannot write", "--out"])
