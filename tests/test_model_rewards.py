"""The CLIP-family rewards of 02_score.py, offline: each is loaded through its own loader from a
tiny random model of the real architecture, saved the way the real checkpoint is published, and
must give the published formula computed here; and 02_score.py under torchrun equals one process."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, stage

scoring, world = stage("02_score"), stage("01_caption")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP's normalisation
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
CAPTIONS = ["a red circle", "two blue squares left of a green triangle " * 12, "nothing at all"]  # the 2nd: > 77 tokens


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the hub; huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def pixels(images):
    """What CLIP's preprocessing gives for 32 px images and a 32 px model: no resize, just normalise."""
    return (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255 - CLIP_MEAN) / CLIP_STD


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 2-layer transformers CLIPModel + CLIPProcessor saved as openai/clip-vit-large-patch14 is, with
    a logit scale other than the initial one. Its BPE vocabulary is the 512 byte symbols of CLIP's (with
    and without the end-of-word mark) and no merges: every word is spelled out, so the tokenizer stays
    small (the real one is 49,408 entries) and the long caption runs well past 77 tokens."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    symbols = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols] +
                                                ["<|startoftext|>", "<|endoftext|>"])}
    torch.manual_seed(3)  # a seed whose cosines have both signs, so both sides of CLIP score's clamp are tested
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    model = CLIPModel(CLIPConfig(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=768))  # 768 as ViT-L/14
    model.logit_scale.data.fill_(np.log(30.0))
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_embeddings(tiny_clip, images):
    """Normalised image and text embeddings [B, D] of the tiny CLIP, computed here from its files."""
    from transformers import CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)(CAPTIONS, padding=True, truncation=True, max_length=77,
                                                      return_tensors="pt")
    assert tokens.input_ids.shape[1] == 77  # the long caption was cut, not dropped
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels(images)).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_clip_score(tiny_clip, images, clip_embeddings):
    image, text = clip_embeddings
    expected = torch.clamp(100 * (image * text).sum(-1), min=0)
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(scoring.load_clip(str(tiny_clip), "cpu")(images, CAPTIONS), expected)


@pytest.mark.parametrize("name", ["pickscore", "sciscore"])
def test_pickscore_and_sciscore(tiny_clip, images, clip_embeddings, name):
    image, text = clip_embeddings
    expected = 30.0 * (image * text).sum(-1)  # exp(logit_scale) * cos
    loader = (lambda s, d: scoring.load_pickscore(s, d, processor=s)) if name == "pickscore" else scoring.load_sciscore
    torch.testing.assert_close(loader(str(tiny_clip), "cpu")(images, CAPTIONS), expected)


def aesthetic_head():
    """The predictor as published: MLP(768).layers, linear layers at indices 0, 2, 4, 6, 7."""
    layers = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                 torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                 torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    return torch.nn.ModuleDict({"layers": layers}).eval()


def test_aesthetic(tiny_clip, images, clip_embeddings, tmp_path):
    head = aesthetic_head()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    image, _ = clip_embeddings
    with torch.no_grad():
        expected = head["layers"](image)[:, 0]
    reward = scoring.load_aesthetic(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), "cpu", backbone=str(tiny_clip))
    torch.testing.assert_close(reward(images, CAPTIONS), expected)


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """(architecture name, model, checkpoint path): an open_clip model of ViT-H-14's classes, 1 layer per
    tower, saved as HPS_v2.1_compressed.pt is published: {"state_dict": ...}."""
    import open_clip
    path = tmp_path_factory.mktemp("tiny_hps")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (path / "tiny-ViT-H-14.json").write_text(json.dumps(config))
    open_clip.add_model_config(path / "tiny-ViT-H-14.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-ViT-H-14").eval()
    with torch.device("meta"):
        real = open_clip.create_model("ViT-H-14", device="meta")
    assert type(model) is type(real) and type(model.visual) is type(real.visual)
    torch.save({"state_dict": model.state_dict()}, path / "HPS_v2.1_compressed.pt")
    return "tiny-ViT-H-14", model, path / "HPS_v2.1_compressed.pt"


def test_hpsv2(tiny_hps, images):
    import open_clip
    arch, model, checkpoint = tiny_hps
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels(images)), dim=-1)
        text = F.normalize(model.encode_text(open_clip.tokenize(CAPTIONS)), dim=-1)
    expected = (image * text).sum(-1)  # the raw cosine, no logit scale
    torch.testing.assert_close(scoring.load_hpsv2(str(checkpoint), "cpu", arch=arch)(images, CAPTIONS), expected)


def test_a_wrong_key_fails_loudly(tiny_clip, tiny_hps, tmp_path):
    from safetensors.torch import load_file, save_file
    shutil.copytree(tiny_clip, tmp_path / "clip")
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    weights["visual_projection.weigth"] = weights.pop("visual_projection.weight")
    save_file(weights, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="visual_projection"):
        scoring.load_reward_model("clip", "x", lambda: scoring.load_clip(str(tmp_path / "clip"), "cpu"))

    head = aesthetic_head().state_dict()
    head["layers.5.weight"] = head.pop("layers.6.weight")
    torch.save(head, tmp_path / "head.pth")
    with pytest.raises(RuntimeError, match="layers.6.weight"):
        scoring.load_aesthetic(str(tmp_path / "head.pth"), "cpu", backbone=str(tiny_clip))

    arch, model, _ = tiny_hps
    state = model.state_dict()
    state["ln_finall.weight"] = state.pop("ln_final.weight")
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    with pytest.raises(RuntimeError, match="ln_final.weight"):
        scoring.load_hpsv2(str(tmp_path / "hps.pt"), "cpu", arch=arch)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 63-scene shapes world (odd: the two ranks get unequal shares), made in-process."""
    out = tmp_path_factory.mktemp("shapes")
    images, captions = world.make_shapes(63, 32, 0)
    world.save_atomic(images, out / "images.npy")
    world.save_atomic(captions, out / "captions.pt")
    return out


@pytest.fixture(scope="module", autouse=True)
def torchrun(shapes, tmp_path_factory):
    """(folder, process): 02_score.py under torchrun, 2 CPU ranks on a copy of the shapes world, started
    before the first test of this file so that its three Python processes start up beside the other tests."""
    out = tmp_path_factory.mktemp("torchrun")
    for name in ("images.npy", "captions.pt"):
        shutil.copy(shapes / name, out / name)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "02_score.py"), "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    yield out, process
    process.communicate()


def score_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["02_score.py", *map(str, args)])
    scoring.main()


@pytest.mark.parametrize("args,expect", [
    (["--rewards", "clip", "--checkpoint", "clip=no-such-org/no-such-clip"],
     ["reward clip", "'no-such-org/no-such-clip'", "--checkpoint clip=LOCAL_PATH"]),
    (["--rewards", "hpsv2", "--checkpoint", "hpsv2=no-such-org/no-such-hps/HPS.pt"],
     ["reward hpsv2", "'no-such-org/no-such-hps/HPS.pt'", "--checkpoint hpsv2=LOCAL_PATH"]),
    (["--rewards", "clip", "--checkpoint", "clip"], ["--checkpoint 'clip'", "NAME=PATH_OR_ID"]),
    (["--checkpoint", "nope=x"], ["--checkpoint 'nope=x'", "aesthetic, clip, pickscore"]),
    (["--rewards", "alignment,pickscor"], ["unknown reward pickscor", "hpsv2"]),
])
def test_bad_input_stops_with_one_line(shapes, monkeypatch, args, expect):
    with pytest.raises(SystemExit) as stop:
        score_main(monkeypatch, "--out", shapes, *args)
    message = str(stop.value.code)
    assert message.startswith("02_score.py: error:") and "\n" not in message, message
    for words in expect:
        assert words in message, (words, message)


def test_torchrun_equals_one_process(shapes, torchrun, monkeypatch):
    score_main(monkeypatch, "--out", shapes)
    one = torch.load(shapes / "scores.pt", weights_only=True)
    out, process = torchrun
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert stdout.count("scored 63 images") == 1  # rank 0 alone prints
    two = torch.load(out / "scores.pt", weights_only=True)
    assert two["names"] == one["names"] and torch.equal(two["scores"], one["scores"])
    assert not [name for name in os.listdir(out) if ".part" in name]


def test_a_missing_second_download_names_itself(tiny_clip, tmp_path):
    with pytest.raises(SystemExit, match="the processor 'no-such-org/no-such-processor'"):
        scoring.load_pickscore(str(tiny_clip), "cpu", processor="no-such-org/no-such-processor")
    torch.save(aesthetic_head().state_dict(), tmp_path / "head.pth")
    with pytest.raises(SystemExit, match="the CLIP backbone 'no-such-org/no-such-clip'"):
        scoring.load_aesthetic(str(tmp_path / "head.pth"), "cpu", backbone="no-such-org/no-such-clip")
