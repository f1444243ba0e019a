"""05_train.py --text-encoder: frozen open_clip and T5 text encoders, on tiny random models built offline.

Each encoder is saved the way the real one is published (open_clip: open_clip_config.json +
open_clip_pytorch_model.bin; T5: a transformers T5ForConditionalGeneration folder with its
tokenizer), loaded back through 04_model.py, and compared with a direct call of the encoder.
"""
import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the hub

import open_clip
import pytest
import torch

from conftest import stage

net, train, sampler = stage("04_model"), stage("05_train"), stage("06_sample")
CAPTIONS = ["a red circle at the top left.", "two blue squares below a green triangle.",
            "a small yellow triangle to the right of a purple circle, " * 8]  # the last one is truncated
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP in open_clip's published layout; its arch is also registered under a name."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    (folder / "miro-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "miro-tiny-clip.json")  # in this process only: for ARCH:PATH
    return folder, model


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random tiny T5 (encoder and decoder, as google/flan-t5-* publish it) and a Unigram tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
    folder = tmp_path_factory.mktemp("t5")
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    words = "a one two three four red green blue yellow purple orange circle square triangle star top bottom left " \
            "right above below of the to and small large at in picture image scene".split()
    unigram.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] + CAPTIONS,
                                trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"],
                                                        unk_token="<unk>"))
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]  # (piece, log prob)
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)  # <pad> 0, </s> 1, <unk> 2, as in T5
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)  # T5 v1.1's layout, tiny
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def specs(tiny_clip, tiny_t5):
    return {"openclip": f"openclip:local-dir:{tiny_clip[0]}", "t5": f"t5:{tiny_t5[0]}"}


def test_openclip_states_are_the_text_towers_final_layer_norm_and_the_mask_ends_at_eot(tiny_clip):
    folder, clip = tiny_clip
    reference = open_clip.get_tokenizer("ViT-H-14")  # the same CLIP BPE for every open_clip CLIP
    for spec in (f"openclip:local-dir:{folder}", f"openclip:miro-tiny-clip:{folder / 'open_clip_pytorch_model.bin'}"):
        ids = net.tokenize(CAPTIONS, 64, spec)
        assert torch.equal(ids, reference(CAPTIONS, context_length=64))
        states, mask = net.frozen_states(spec, ids)
        # open_clip's own forward at its full 77 positions: the last block, through ln_final
        ids77 = reference(CAPTIONS)
        with torch.no_grad():
            direct = clip.forward_intermediates(text=ids77, text_indices=1, normalize_intermediates=True,
                                                intermediates_only=True)["text_intermediates"][-1]
            pooled = clip.encode_text(ids77)  # the CLIP text embedding: the end token's state, projected
        short = [len(reference.encode(c)) + 2 for c in CAPTIONS[:2]]  # start + BPE tokens + end
        # causal: padding never reaches the words (64 and 77 positions round differently in float32;
        # a leak of the padding would be off by far more than this tolerance)
        torch.testing.assert_close(states[:2], direct[:2, :64], atol=1e-4, rtol=1e-4)
        assert mask[:2].sum(1).tolist() == short and mask[2].all()  # the long caption is cut, ending in EOT
        assert torch.equal(mask, torch.arange(64) < mask.sum(1, keepdim=True))  # a prefix: words, then padding
        torch.testing.assert_close(states[torch.arange(2), torch.tensor(short) - 1] @ clip.text_projection, pooled[:2])


def test_t5_states_are_the_encoders_last_hidden_state_and_the_mask_is_the_tokenizers(tiny_t5, specs):
    _, model, tokenizer = tiny_t5
    ids = net.tokenize(CAPTIONS, 24, specs["t5"])
    direct = tokenizer(CAPTIONS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert torch.equal(ids, direct.input_ids) and ids[2, -1] == tokenizer.eos_token_id  # truncated, still ends in </s>
    states, mask = net.frozen_states(specs["t5"], ids)
    assert torch.equal(mask, direct.attention_mask.bool()) and not mask[:2].all()
    with torch.no_grad():  # the model as built, before saving: also checks the loader read every weight
        expected = model.encoder(input_ids=direct.input_ids, attention_mask=direct.attention_mask).last_hidden_state
    torch.testing.assert_close(states, expected)
    assert states.shape == (3, 24, 32)


@pytest.mark.parametrize("kind", ["openclip", "t5"])
def test_frozen_encoder_gets_no_gradient_no_update_and_is_not_saved(kind, specs, monkeypatch):
    spec = specs[kind]
    torch.manual_seed(0)
    model, model_args = net.build("tiny", 2, text_encoder=spec)
    encoder = net.frozen_text_encoder(spec)
    before = {name: p.clone() for name, p in encoder.model.named_parameters()}
    calls = []
    call = type(encoder).__call__
    monkeypatch.setattr(type(encoder), "__call__", lambda self, ids: calls.append(1) or call(self, ids))
    options = argparse.Namespace(lr=1e-2, weight_decay=0.01, text_lr=1.0)
    optimizer = train.make_optimizer(model.train(), options, torch.device("cpu"))
    x, t, levels, ids = net.dummy_inputs(model_args, 2)
    loss = train.flow_matching_loss(model, x.clamp(-1, 1), torch.randn_like(x), t, levels, ids, torch.ones(2)).mean()
    loss.backward()
    optimizer.step()
    assert len(calls) == 1  # both passes of the step share one encoding of the batch
    assert not encoder.model.training and model.training
    assert all(p.grad is None and not p.requires_grad for p in encoder.model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in encoder.model.named_parameters())
    assert model.text_proj.weight.grad.abs().sum() > 0  # the projection is trained
    frozen_ids = {id(p) for p in encoder.model.parameters()}
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(list(model.parameters())) and not frozen_ids & {id(p) for p in in_optimizer}
    # the state dict is the own-encoder model's, minus the own encoder, with a projection from the frozen width
    own = set(net.build("tiny", 2)[0].state_dict())
    saved = model.state_dict()
    assert set(saved) == {key for key in own if not key.startswith("text.")}
    assert saved["text_proj.weight"].shape == (model_args["latent_dim"], encoder.width)


def in_process(module, *args):
    """Run a stage's main() with these command-line arguments, in this process (no interpreter start-up)."""
    saved = sys.argv
    sys.argv = [module.__name__ + ".py", *map(str, args)]
    try:
        module.main()
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    in_process(stage("01_caption"), "--out", out, "--n", 24, "--seed", 4)
    in_process(stage("02_score"), "--out", out)
    in_process(stage("03_bin"), "--out", out)
    return out


@pytest.mark.parametrize("kind", ["openclip", "t5"])
def test_train_two_steps_then_sample_rebuilds_the_encoder_from_the_checkpoint(kind, specs, tiny_world):
    spec = specs[kind]
    in_process(train, "--out", tiny_world, "--run", kind, "--text-encoder", spec, "--steps", 2, "--batch-size", 2,
               "--warmup", 1, "--log-every", 1, "--peak-tflops", 1)
    ckpt = torch.load(tiny_world / "runs" / kind / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_args"]["text_encoder"] == spec
    assert set(ckpt["model"]) == set(ckpt["ema"]) and not any(key.startswith("text.") for key in ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # every trained tensor, nothing frozen
    log = [json.loads(line) for line in (tiny_world / "runs" / kind / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    net.frozen_text_encoder.cache_clear()  # 06 must rebuild the encoder from what the checkpoint records
    in_process(sampler, "--out", tiny_world, "--run", kind, "--n", 2, "--steps", 2)
    assert net.frozen_text_encoder.cache_info().misses == 1
    samples = torch.load(tiny_world / "runs" / kind / "samples.pt", weights_only=True)
    assert samples["images"].shape == (2, 32, 32, 3) and samples["images"].dtype == torch.uint8
    with pytest.raises(SystemExit, match="trained with --text-encoder"):  # resuming must name the same encoder
        in_process(train, "--out", tiny_world, "--run", kind, "--steps", 3, "--resume")


def test_a_missing_model_says_which_and_how_to_pass_a_local_path(caplog):
    for spec, hint in [("t5:/nonexistent/flan-t5-xl", "--text-encoder t5:/path/to/folder"),
                       ("openclip:ViT-H-14:/nonexistent/open_clip_pytorch_model.bin",
                        "--text-encoder openclip:ViT-H-14:/path/to/open_clip_pytorch_model.bin")]:
        with pytest.raises(SystemExit) as stop:
            net.frozen_text_encoder(spec)
        line = str(stop.value)
        assert "\n" not in line and "error: cannot load text encoder" in line and spec in line and hint in line
    assert not caplog.records  # open_clip's own error log is silenced: the user reads one line
    with pytest.raises(SystemExit, match="unknown text encoder 'bert:base'"):
        net.frozen_text_encoder("bert:base")
