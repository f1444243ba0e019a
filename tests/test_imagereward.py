"""The ImageReward loader of 02_score.py on a tiny random ImageReward, saved the way
THUDM/ImageReward publishes it (ImageReward.pt with the original BLIP key names,
med_config.json, bert-base-uncased's vocab.txt), against a direct computation written
here from the original code (BLIP's vit.py and med.py, ImageReward.py), offline."""
import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import stage

scoring = stage("02_score")

# Tiny sizes; the real ones are ViT-L/16 (1024 wide, 24 blocks, 16 heads, 224 px) and BERT-base.
VISION_WIDTH, VISION_DEPTH, PATCH, GRID = 128, 2, 8, 3  # 2 heads of 64, 24 px, 1 + 9 image tokens
WORDS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square",
         "left", "of", "the", "is", "##s", "two"]
MED = {"vocab_size": len(WORDS) + 2, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 48, "max_position_embeddings": 40, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
       "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768, "add_cross_attention": True}
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: self.mean, self.std


def original_state_dict(seed=0):
    """Random weights under ImageReward.pt's names (ImageReward.state_dict(): blip = BLIP_Pretrain,
    mlp = MLP(768)), with the shapes of the original modules."""
    W, H, I, V = VISION_WIDTH, MED["hidden_size"], MED["intermediate_size"], MED["vocab_size"]
    shapes = {"blip.visual_encoder.cls_token": (1, 1, W), "blip.visual_encoder.pos_embed": (1, 1 + GRID**2, W),
              "blip.visual_encoder.patch_embed.proj.weight": (W, 3, PATCH, PATCH),
              "blip.visual_encoder.patch_embed.proj.bias": (W,), "blip.visual_encoder.norm.weight": (W,),
              "blip.visual_encoder.norm.bias": (W,)}
    for i in range(VISION_DEPTH):
        for name, shape in {"norm1": (W,), "attn.qkv": (3 * W, W), "attn.proj": (W, W), "norm2": (W,),
                            "mlp.fc1": (4 * W, W), "mlp.fc2": (W, 4 * W)}.items():
            shapes[f"blip.visual_encoder.blocks.{i}.{name}.weight"] = shape
            shapes[f"blip.visual_encoder.blocks.{i}.{name}.bias"] = shape[:1]
    text = "blip.text_encoder."
    shapes.update({text + "embeddings.word_embeddings.weight": (V, H),
                   text + "embeddings.position_embeddings.weight": (MED["max_position_embeddings"], H),
                   text + "embeddings.LayerNorm.weight": (H,), text + "embeddings.LayerNorm.bias": (H,)})
    for i in range(MED["num_hidden_layers"]):
        layer = f"{text}encoder.layer.{i}."
        for name, shape in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                            "attention.self.value": (H, H), "attention.output.dense": (H, H),
                            "attention.output.LayerNorm": (H,), "crossattention.self.query": (H, H),
                            "crossattention.self.key": (H, W), "crossattention.self.value": (H, W),
                            "crossattention.output.dense": (H, H), "crossattention.output.LayerNorm": (H,),
                            "intermediate.dense": (I, H), "output.dense": (H, I), "output.LayerNorm": (H,)}.items():
            shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = shape, shape[:1]
    for name, shape in {"blip.vision_proj": (256, W), "blip.text_proj": (256, H), "mlp.layers.0": (1024, H),
                        "mlp.layers.2": (128, 1024), "mlp.layers.4": (64, 128), "mlp.layers.6": (16, 64),
                        "mlp.layers.7": (1, 16)}.items():
        shapes[name + ".weight"], shapes[name + ".bias"] = shape, shape[:1]

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in name.lower() and name.endswith("weight"):
            state[name] = 1 + 0.2 * noise  # layer norm gains around 1
        elif len(shape) == 1 or name.endswith(("cls_token", "pos_embed")):
            state[name] = 0.2 * noise
        else:  # fan-in scaled, so that activations stay of order 1 through the stack
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]:
        state["blip.visual_encoder." + name] *= 1e-3  # variance ~1e-6 into the first layer norm: its eps shows
    state[text + "embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"])[None]  # a buffer
    return state


def save_checkpoint(folder, state, vocab=WORDS, med=MED):
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "ImageReward.pt"))
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(med, f)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    return str(folder)


def token_ids(caption, length=35):
    """BERT WordPiece by hand for captions of words of WORDS and their plurals: [CLS] pieces [SEP],
    cut and padded to 35 tokens as ImageReward.py's tokenizer call does."""
    pieces = [piece for w in caption.lower().split() for piece in ([w] if w in WORDS else [w[:-1], "##s"])]
    words = [WORDS.index(piece) for piece in pieces][:length - 2]
    ids = [WORDS.index("[CLS]")] + words + [WORDS.index("[SEP]")]
    return torch.tensor(ids + [0] * (length - len(ids))), torch.tensor([1] * len(ids) + [0] * (length - len(ids)))


def preprocess(image, size=GRID * PATCH):
    """ImageReward's _transform on a PIL image: Resize(size, BICUBIC) of the short side, CenterCrop,
    ToTensor, Normalize with CLIP's mean and std. (3, size, size)."""
    pil = Image.fromarray(image)
    w, h = pil.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    x = torch.tensor(np.asarray(pil.crop((left, top, left + size, top + size))), dtype=torch.float32) / 255
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((x - mean) / std).permute(2, 0, 1)


def reference_reward(state, images, captions):
    """ImageReward.score written out from BLIP's vit.py and med.py, reading ImageReward.pt's names."""
    def lin(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    def attend(q, k, v, heads, additive_mask=None):  # (B, Lq, D), (B, Lk, D) x 2 -> (B, Lq, D)
        B, Lq, D = q.shape
        split = lambda t: t.reshape(B, t.shape[1], heads, D // heads).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads)
        if additive_mask is not None:
            scores = scores + additive_mask
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, Lq, D)

    v = "blip.visual_encoder."
    pixels = torch.stack([preprocess(image) for image in images])
    x = F.conv2d(pixels, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([state[v + "cls_token"].expand(len(x), 1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + state[v + "pos_embed"]
    for i in range(VISION_DEPTH):  # pre-norm blocks, layer norm eps 1e-6, exact GELU
        block = f"{v}blocks.{i}."
        q, k, val = lin(norm(x, block + "norm1", 1e-6), block + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, val, VISION_WIDTH // 64), block + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, block + "norm2", 1e-6), block + "mlp.fc1")), block + "mlp.fc2")
    image_tokens = norm(x, v + "norm", 1e-6)  # (B, 1 + GRID^2, W)

    t, eps, heads = "blip.text_encoder.", MED["layer_norm_eps"], MED["num_attention_heads"]
    ids, mask = map(torch.stack, zip(*[token_ids(c) for c in captions]))  # (B, 35) each
    h = state[t + "embeddings.word_embeddings.weight"][ids] + state[t + "embeddings.position_embeddings.weight"][:35]
    h = norm(h, t + "embeddings.LayerNorm", eps)  # med.py: no token type embedding
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(MED["num_hidden_layers"]):  # post-norm BERT layers: self-attention, cross-attention, MLP
        a, c, o = f"{t}encoder.layer.{i}.attention.", f"{t}encoder.layer.{i}.crossattention.", f"{t}encoder.layer.{i}."
        h = norm(lin(attend(lin(h, a + "self.query"), lin(h, a + "self.key"), lin(h, a + "self.value"), heads,
                            padding), a + "output.dense") + h, a + "output.LayerNorm", eps)
        h = norm(lin(attend(lin(h, c + "self.query"), lin(image_tokens, c + "self.key"),
                            lin(image_tokens, c + "self.value"), heads), c + "output.dense") + h,
                 c + "output.LayerNorm", eps)
        h = norm(lin(F.gelu(lin(h, o + "intermediate.dense")), o + "output.dense") + h, o + "output.LayerNorm", eps)
    r = h[:, 0]  # the [CLS] position
    for index in (0, 2, 4, 6, 7):  # MLP: Linear, Dropout, ... with no activation
        r = lin(r, f"mlp.layers.{index}")
    return (r[:, 0] - MEAN) / STD


CAPTIONS = ["a red circle", "two blue squares", "the red circle is left of the blue square",
            " ".join(["a red circle"] * 15)]  # 45 words: cut to 33 + [CLS] + [SEP]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)  # not square: crop


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    state = original_state_dict()
    return save_checkpoint(tmp_path_factory.mktemp("imagereward"), state), state


def test_matches_the_original_formula(tiny, images):
    folder, state = tiny
    reward = scoring.load_imagereward(folder, "cpu")
    scores = reward(images, CAPTIONS)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    expected = reference_reward(state, images, CAPTIONS)
    assert torch.allclose(scores, expected, atol=1e-4, rtol=1e-4), (scores, expected)
    assert expected.std() > 0.05  # the scores differ: a constant could not pass for a match
    # The caption matters, and only its first 33 words do.
    two_captions = reward(images[[0, 0]], ["a red circle", "two blue squares"])
    assert abs(float(two_captions[0] - two_captions[1])) > 1e-3
    cut = reward(images[[3, 3]], [CAPTIONS[3], CAPTIONS[3] + " two blue squares"])
    assert torch.allclose(cut, scores[[3, 3]], atol=1e-4, rtol=1e-4)  # a batch of 2 against one of 4: float32 rounding
    # The checkpoint's path works as the folder does, and is in the registry under its hub id.
    assert torch.allclose(scoring.load_imagereward(os.path.join(folder, "ImageReward.pt"), "cpu")(images, CAPTIONS),
                          scores, atol=1e-6)
    assert scoring.MODEL_REWARDS["imagereward"] == (scoring.load_imagereward, "THUDM/ImageReward")


@pytest.mark.parametrize("change", ["missing", "extra", "prefixed"])
def test_wrong_keys_fail_loudly(tiny, tmp_path, change):
    _, state = tiny
    state = dict(state)
    if change == "missing":
        del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"]
        expect = "text.encoder.layer.1.crossattention.self.key.bias"
    elif change == "extra":
        state["blip.itm_head.weight"] = torch.zeros(2, MED["hidden_size"])
        expect = "blip.itm_head.weight"
    else:
        state = {"module." + k: v for k, v in state.items()}
        expect = "module.blip"
    with pytest.raises(RuntimeError, match="state_dict") as error:
        scoring.load_imagereward(save_checkpoint(tmp_path, state), "cpu")
    assert expect in str(error.value)


def test_missing_files_and_a_wrong_vocabulary_stop_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # if the hub was imported before
    for source in [str(tmp_path), "THUDM/ImageReward"]:  # an empty folder; the hub, offline
        with pytest.raises(SystemExit) as stop:
            scoring.load_imagereward(source, "cpu")
        message = str(stop.value)
        assert message.startswith("02_score.py: error:") and "imagereward" in message and "\n" not in message
        assert "--checkpoint imagereward=LOCAL_PATH" in message
    folder = save_checkpoint(tmp_path / "short_vocab", tiny[1], vocab=WORDS[:-1])
    with pytest.raises(SystemExit, match="tokenizer has 18 words, med_config.json says 19"):
        scoring.load_imagereward(folder, "cpu")
