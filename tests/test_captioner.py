"""The vision-language captioner of 01_caption.py and the VQAScore reward of 02_score.py,
on a tiny random Qwen2.5-VL (the default architecture) saved as the hub checkpoint is."""
import ast
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, stage
from tiny_vlm import save_tiny_vlm

world, scoring = stage("01_caption"), stage("02_score")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small gain nothing from threads, and on a busy 2-core machine two threads
    waiting on each other made generation 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, processor): the tiny checkpoint, loaded back through the project's loader."""
    folder = save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))
    model, processor = world.load_vlm(folder, torch.device("cpu"))
    return folder, model, processor


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def direct_inputs(processor, image, text):
    """One conversation, tokenized by the processor's own chat-template path (no batching, no padding)."""
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("answer,caption", [
    ("<CAPTION>A red circle.</CAPTION>", "A red circle."),
    ("Sure! <CAPTION>  a dog\n on  the grass </CAPTION> Hope this helps.", "a dog on the grass"),
    ("<caption>tags in lower case</caption>", "tags in lower case"),
    ("<CAPTION>first</CAPTION>\n<CAPTION>second</CAPTION>", "first"),
    ("<CAPTION> </CAPTION><CAPTION>the first non-empty one</CAPTION>", "the first non-empty one"),
    ("<CAPTION>an answer cut off by max_new_tok", "an answer cut off by max_new_tok"),
    ("the opening tag is missing</CAPTION>", "the opening tag is missing"),
    ("A caption without any tag.", None),
    ("", None),
    ("<CAPTION>\n  \n</CAPTION>", None),
    ("<CAPTION></CAPTION> text after the tags", None),
])
def test_caption_from_answer(answer, caption):
    assert world.caption_from_answer(answer) == caption


def test_batched_left_padded_generation_matches_one_image_at_a_time(tiny):
    _, model, processor = tiny
    assert processor.tokenizer.padding_side == "left"
    images = random_images([(84, 56), (56, 112), (56, 56)])  # different numbers of image tokens: padding needed
    prompt = world.SHORT_PROMPT
    batched = world.vlm_answers(model, processor, images, prompt, max_new_tokens=6)
    lengths = []
    for image, answer in zip(images, batched):
        inputs = direct_inputs(processor, image, prompt)
        lengths.append(inputs["input_ids"].shape[1])
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert len(tokens) > 0
        assert answer == processor.decode(tokens, skip_special_tokens=True)
    assert len(set(lengths)) == 3  # the batch really was padded


def test_caption_folder_places_captions_and_counts_fallbacks(tiny, tmp_path, monkeypatch):
    """Answers with a caption replace the alt text in image order; the others keep it and are
    counted; the shares of two ranks put together give the whole."""
    _, model, processor = tiny
    for i, image in enumerate(random_images([(40, 30)] * 5)):
        image.save(tmp_path / f"{i}.png")
    captions = {"alt": [f"alt {i}" for i in range(5)], "meta": [{"file": f"{i}.png"} for i in range(5)]}

    def answers(model, processor, images, prompt, max_new_tokens):  # image i answers in tags when i is even
        assert all(im.size == (28, 28) for im in images)
        kind = "long" if prompt == world.LONG_PROMPT else "short"
        seen = answers.calls.setdefault(kind, 0)
        answers.calls[kind] += len(images)
        return [f"<CAPTION>{kind} {seen + j}</CAPTION>" if (seen + j) % 2 == 0 else "no tags" for j in range(len(images))]

    answers.calls = {}
    monkeypatch.setattr(world, "vlm_answers", answers)
    long, short, fallbacks = world.caption_folder(model, processor, tmp_path, captions, 28, 2, 4)
    assert long == ["long 0", "alt 1", "long 2", "alt 3", "long 4"]
    assert short == ["short 0", "alt 1", "short 2", "alt 3", "short 4"]
    assert fallbacks == {"long": 2, "short": 2}
    shares = []
    for rank in (0, 1):
        answers.calls = {"long": world.shard(5, rank, 2).start, "short": world.shard(5, rank, 2).start}
        shares.append(world.caption_folder(model, processor, tmp_path, captions, 28, 2, 4, rank, 2))
    assert shares[0][0] + shares[1][0] == long and shares[0][1] + shares[1][1] == short
    assert {k: shares[0][2][k] + shares[1][2][k] for k in fallbacks} == fallbacks


def test_vqascore_is_softmax_probability_of_yes(tiny):
    folder, _, processor = tiny
    from transformers import AutoModelForImageTextToText
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    load, default_source = scoring.MODEL_REWARDS["vqascore"]
    assert default_source == world.DEFAULT_CAPTIONER
    vqascore = load(folder, "cpu")
    images = np.stack([np.asarray(im) for im in random_images([(32, 32)] * 3, seed=1)])
    captions = ["a red circle", "two blue squares above a green triangle", "x"]  # different lengths: padding
    scores = vqascore(images, captions)
    assert scores.dtype == torch.float32 and scores.shape == (3,)

    yes = processor.tokenizer.convert_tokens_to_ids("Yes")  # one token in this vocabulary, as in Qwen's
    assert processor.tokenizer.encode("Yes", add_special_tokens=False) == [yes]
    expected = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            question = f'Does this figure show "{caption}"? Please answer yes or no.'
            inputs = direct_inputs(processor, Image.fromarray(image).resize((224, 224), Image.BICUBIC), question)
            next_token = reference(**inputs).logits[0, -1]  # (V,)
            expected.append(torch.softmax(next_token, -1)[yes])
    assert torch.allclose(scores, torch.stack(expected), atol=1e-5, rtol=1e-4), (scores, expected)
    assert len(set(scores.tolist())) == 3


def test_folder_end_to_end_with_the_tiny_captioner(tiny, tmp_path, monkeypatch, capsys):
    folder, model, processor = tiny
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    pictures = random_images([(60, 40), (40, 60), (50, 50)], seed=2)
    for i, image in enumerate(pictures):
        image.save(images_dir / f"{i}.png")
        (images_dir / f"{i}.txt").write_text(f"alt text {i}")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["01_caption.py", "--source", "folder", "--images", str(images_dir),
                                      "--captioner", str(folder), "--out", str(out), "--caption-size", "56",
                                      "--max-new-tokens", "5", "--caption-batch-size", "2", "--device", "cpu"])
    world.main()
    captions = torch.load(out / "captions.pt", weights_only=True)
    assert np.load(out / "images.npy").shape == (3, 32, 32, 3)
    assert captions["alt"] == [f"alt text {i}" for i in range(3)] and captions["captioner"] == str(folder)

    # What the model answered, image by image: every answer without a caption keeps the alt text.
    squares = [world.read_square(images_dir / f"{i}.png", 56) for i in range(3)]
    for kind, prompt in (("long", world.LONG_PROMPT), ("short", world.SHORT_PROMPT)):
        parsed = [world.caption_from_answer(a) for a in world.vlm_answers(model, processor, squares, prompt, 5)]
        assert captions[kind] == [alt if p is None else p for p, alt in zip(parsed, captions["alt"])]
        assert captions["fallbacks"][kind] == sum(p is None for p in parsed)
    assert "had no caption between <CAPTION> tags" in capsys.readouterr().out


def test_checkpoint_has_the_published_layout_and_a_missing_weight_is_an_error(tiny, tmp_path):
    """Keys as in Qwen/Qwen2.5-VL-3B-Instruct's safetensors (model.layers.*, visual.blocks.*,
    visual.merger.*, embeddings tied to the head); a checkpoint that lacks one is refused
    rather than run with a random weight."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = shutil.copytree(tiny[0], tmp_path / "broken")
    weights = load_file(folder / "model.safetensors")
    assert {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "visual.blocks.1.attn.qkv.weight",
            "visual.merger.mlp.0.weight", "visual.patch_embed.proj.weight"} <= set(weights)
    assert "lm_head.weight" not in weights and not any("language_model" in k for k in weights)
    weights.pop("visual.merger.mlp.0.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="state_dict lacks.*merger"):
        world.load_vlm(folder, torch.device("cpu"))


def test_missing_captioner_stops_with_one_line(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "im.png")
    missing = str(tmp_path / "no_such_model")
    monkeypatch.setattr(sys, "argv", ["01_caption.py", "--source", "folder", "--images", str(tmp_path),
                                      "--captioner", missing, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        world.main()
    message = str(stop.value.code)
    assert "\n" not in message and missing in message and "no such folder" in message  # a path, not a hub id


def test_transformers_is_imported_only_inside_loaders():
    """The shapes world and the offline rewards must run without transformers."""
    for script in ("01_caption.py", "02_score.py"):
        tree = ast.parse((ROOT / script).read_text())
        for node in tree.body:  # module level only; loaders import inside their function
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("transformers", "open_clip") for n in names), (script, names)
