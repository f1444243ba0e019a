"""04_model.py: sizes, reward tokens, gradients, and the flow-matching math of 05_train.py."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run, stage

net = stage("04_model")
train = stage("05_train")


def tiny(num_rewards, **overrides):
    torch.manual_seed(0)
    return net.build("tiny", num_rewards, **overrides)


def test_paper_preset_is_0_36b_parameters():
    with torch.device("meta"):  # shapes only: no memory, no time
        model, _ = net.build("paper", 7)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 0.36e9 - 1) < 0.10, params


@pytest.mark.slow
def test_model_main_prints_the_table():
    out = run("04_model.py", "--preset", "tiny").stdout
    assert "fwd GFLOP/img" in out and "sample 50x2 GFLOP" in out
    row = next(line for line in out.splitlines() if line.split()[0] == "tiny")
    assert "fwd/bwd ok" in row and "4 reward levels each change v" in row


def test_flop_counter_counts_a_linear_layer_exactly():
    layer = torch.nn.Linear(32, 16, bias=False)
    assert net.count_flops(lambda: layer(torch.randn(5, 32))) == 2 * 5 * 32 * 16


def test_each_reward_level_changes_the_output_and_only_through_its_token():
    model, args = tiny(3)
    x_t, t, levels, ids = net.dummy_inputs(args, 2)
    with torch.no_grad():
        base = model(x_t, t, levels, ids)[0]
        for r in range(3):
            moved = levels.clone()
            moved[:, r] = 1 - moved[:, r]
            assert not torch.allclose(model(x_t, t, moved, ids)[0], base, atol=1e-5)
        assert torch.equal(model(x_t, t, levels.clone(), ids)[0], base)  # same levels, same output


def test_baseline_has_no_reward_tokens():
    model, args = tiny(0)
    assert not any("reward" in name for name, _ in model.named_parameters())
    x_t, t, _, ids = net.dummy_inputs(args, 2)
    tokens, mask = model.encode_text(ids)
    cond, cond_mask = model.condition(t, torch.zeros(2, 0), tokens, mask)
    assert cond.shape[1] == 1 + args["text_len"]  # the time token and the text, nothing else
    conditioned, args4 = tiny(4)
    tokens4, mask4 = conditioned.encode_text(ids)
    assert conditioned.condition(t, torch.rand(2, 4), tokens4, mask4)[0].shape[1] == 1 + 4 + args["text_len"]
    assert model(x_t, t, torch.zeros(2, 0), ids)[0].shape == x_t.shape


def test_padding_does_not_change_the_text_tokens():
    model, args = tiny(1)
    model = model.double()  # 8 and 64 positions round differently in float32; in float64 by ~1e-15
    ids = net.tokenize(["a red circle"], args["text_len"])
    with torch.no_grad():
        short, _ = model.encode_text(ids[:, :8])
        full, mask = model.encode_text(ids)
    real = mask[0].sum()
    assert torch.allclose(short[0, :real], full[0, :real], atol=1e-10, rtol=0)


def test_trimmed_padding_gives_the_same_velocity():
    """05_train.py keeps only a batch's longest caption (rounded up to 8): padding is masked in
    every attention, so the velocity must not change."""
    model, args = tiny(2)
    model = model.double()
    x_t, t, levels, ids = net.dummy_inputs(args, 2)
    real = int((ids != net.PAD_ID).sum(1).max())
    with torch.no_grad():
        full, _ = model(x_t.double(), t, levels.double(), ids)
        trimmed, _ = model(x_t.double(), t, levels.double(), ids[:, :real])
    assert real < ids.shape[1]
    assert torch.allclose(full, trimmed, atol=1e-10, rtol=0)


def test_self_cond_call_is_the_two_passes_it_replaces():
    """model(..., self_cond=s): a first pass without gradients, then a pass that sees its latents
    times s; the same as the two calls written out."""
    model, args = tiny(2)
    model = model.double()
    torch.nn.init.normal_(model.prev_proj.weight, std=0.1)  # zero at init: the latents would change nothing
    x_t, t, levels, ids = net.dummy_inputs(args, 3)
    x_t, levels, s = x_t.double(), levels.double(), torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        _, guess = model(x_t, t, levels, ids)
        expected, _ = model(x_t, t, levels, ids, prev_latents=guess * s.view(-1, 1, 1))
        zeros, _ = model(x_t, t, levels, ids)
    got, _ = model(x_t, t, levels, ids, self_cond=s)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert not torch.allclose(got[0], zeros[0]) and torch.allclose(got[1], zeros[1], atol=1e-12, rtol=0)


def test_image_self_cond_reads_the_first_pass_estimate():
    """self_cond="image": the second pass sees the first pass's clean-image estimate x_t - t v
    (t clamped at T_MIN under x-prediction) times s; an estimate of zeros is no estimate."""
    model, args = tiny(2, self_cond="image")
    model = model.double()
    torch.nn.init.normal_(model.prev_image_in.weight, std=0.01)  # zero at init: the estimate would change nothing
    x_t, _, levels, ids = net.dummy_inputs(args, 3)
    x_t, levels, t, s = x_t.double(), levels.double(), torch.tensor([0.02, 0.5, 0.9]), torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        v, _ = model(x_t, t, levels, ids)
        estimate = x_t - t.clamp_min(net.T_MIN).double().view(-1, 1, 1, 1) * v
        expected, _ = model(x_t, t, levels, ids, prev_image=estimate * s.view(-1, 1, 1, 1))
        zeros, _ = model(x_t, t, levels, ids, prev_image=torch.zeros_like(x_t))
    torch.testing.assert_close(model.estimate(x_t, v, t), estimate, atol=1e-12, rtol=0)
    got, _ = model(x_t, t, levels, ids, self_cond=s)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert not torch.allclose(got[0], v[0]) and torch.allclose(got[1], v[1], atol=1e-12, rtol=0)
    assert torch.allclose(zeros, v, atol=1e-12, rtol=0)


def test_pixel_skip_adds_the_gated_grey_detail_to_the_estimate():
    """pixel_skip: the clean-image estimate is the patch output plus g times the grey of x_t's detail (x_t less
    its 3x3 mean, averaged over R, G, B), g read per patch from its token. Made last and zero-initialised, it leaves
    the rest of the network's start as it is without it, and changes nothing. With the gate's weight at zero and its
    bias b, the estimate is the plain one plus b times that grey detail."""
    model, args = tiny(2, prediction="x", pixel_skip=True)
    model = model.double()
    plain, _ = tiny(2, prediction="x")  # the same seed
    plain = plain.double()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in plain.state_dict().items())
    x_t, _, levels, ids = net.dummy_inputs(args, 3)
    x_t, levels, t = x_t.double(), levels.double(), torch.tensor([0.02, 0.5, 0.9])
    with torch.no_grad():
        v0, _ = plain(x_t, t, levels, ids)
        torch.testing.assert_close(model(x_t, t, levels, ids)[0], v0, atol=1e-12, rtol=0)
        model.pixel_skip.bias.fill_(0.3)
        v, _ = model(x_t, t, levels, ids)
    mean3 = torch.stack([F.pad(x_t, (1, 1, 1, 1))[..., i:i + 32, j:j + 32] for i in range(3) for j in range(3)])
    count = torch.stack([F.pad(torch.ones_like(x_t), (1, 1, 1, 1))[..., i:i + 32, j:j + 32] for i in range(3) for j in range(3)])
    detail = x_t - mean3.sum(0) / count.sum(0)  # the mean over the window's pixels in the image
    grey = detail.mean(1, keepdim=True).expand_as(x_t)
    torch.testing.assert_close(model.estimate(x_t, v, t), plain.estimate(x_t, v0, t) + 0.3 * grey, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="pixel_skip"):
        tiny(2, prediction="v", pixel_skip=True)
    with pytest.raises(ValueError, match="pixel_skip"):
        tiny(2, prediction="x", pixel_skip="grey")


def test_tokenizer_is_open_clips_and_leaves_the_package_unimported():
    """tokenize() loads open_clip's tokenizer.py alone: the same ids as the package's CLIP tokenizer,
    without importing open_clip (and with it torchvision and timm) in a stage on the default path."""
    import open_clip
    captions = ["a red circle left of 2 blue squares", "nothing", "Ünïcode &amp; spaces  "]
    assert torch.equal(net.tokenize(captions, 16), open_clip.tokenize(captions, context_length=16))
    code = ("import sys; m = __import__('04_model'); m.tokenize(['a red circle'], 8); "
            "print(sorted({'open_clip', 'torchvision', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_noisy_interpolates_from_data_at_t0_to_noise_at_t1():
    x, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.equal(train.noisy(x, eps, torch.zeros(3)), x)
    assert torch.equal(train.noisy(x, eps, torch.ones(3)), eps)
    t = torch.tensor([0.25, 0.5, 0.9])
    x_t = train.noisy(x, eps, t)
    # the target velocity eps - x is constant along the path: one Euler step to t = 0 lands on x exactly
    assert torch.allclose(x_t - t.view(-1, 1, 1, 1) * (eps - x), x, atol=1e-6)


class Oracle(torch.nn.Module):
    """Knows the data and the noise: predicts v = eps - x, the flow-matching target."""

    def __init__(self, x, eps, shift=0.0):
        super().__init__()
        self.x, self.eps, self.shift = x, eps, shift

    def forward(self, x_t, t, levels, ids, prev_latents=None, self_cond=None):
        return self.eps - self.x + self.shift, torch.zeros(len(x_t), 2, 4)


def test_loss_is_zero_for_the_true_velocity_and_grows_with_the_error():
    x, eps = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t, levels, ids, self_cond = torch.tensor([0.01, 0.3, 0.6, 0.9]), torch.rand(4, 2), torch.zeros(4, 5, dtype=torch.long), torch.ones(4)
    for weight in ("image", "velocity"):
        assert torch.equal(train.flow_matching_loss(Oracle(x, eps), x, eps, t, levels, ids, self_cond, weight), torch.zeros(4))
    off = train.flow_matching_loss(Oracle(x, eps, shift=0.5), x, eps, t, levels, ids, self_cond, "velocity")
    assert torch.allclose(off, torch.full((4,), 0.25))
    # image weighting: a velocity off by 0.5 puts x_hat = x_t - t v off by 0.5 t (t clamped at T_MIN)
    off = train.flow_matching_loss(Oracle(x, eps, shift=0.5), x, eps, t, levels, ids, self_cond, "image")
    assert torch.allclose(off, 0.25 * torch.tensor([0.05, 0.3, 0.6, 0.9]) ** 2)


def test_velocity_from_the_true_image_is_the_target():
    x, eps, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8), torch.tensor([0.05, 0.3, 0.6, 1.0])
    v = net.velocity_from_image(train.noisy(x, eps, t), x, t)
    assert torch.allclose(v, eps - x, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_raw_output_is_the_image_or_the_skip_residual(prediction):
    """With the output layer zeroed, an x-predicting net guesses the image 0 (v = x_t / t) and a
    v-predicting one the linear guess c_skip x_t."""
    model, args = tiny(1, prediction=prediction)
    torch.nn.init.zeros_(model.patch_out.weight), torch.nn.init.zeros_(model.patch_out.bias)
    x_t, _, levels, ids = net.dummy_inputs(args, 3)
    t = torch.tensor([0.02, 0.5, 1.0])
    with torch.no_grad():
        v, _ = model(x_t, t, levels, ids)
    expect = x_t / t.clamp_min(net.T_MIN).view(-1, 1, 1, 1) if prediction == "x" else net.skip_scales(t, 0.5)[0] * x_t
    assert torch.allclose(v, expect, atol=1e-5)


def test_pca_interface_hands_back_patches_of_its_subspace():
    """fit_interface on images whose patches lie in a data_dim-wide subspace: patch_out undoes patch_in once
    each channel is divided by its std, so patch_out(patch_in(p) / std) = p for every such patch."""
    model, _ = tiny(0, interface="pca", data_dim=16)
    torch.manual_seed(0)
    basis, mean = torch.linalg.qr(torch.randn(768, 16))[0].T, torch.randn(768) * 0.1  # 16 directions
    coords = torch.randn(512, 16) * torch.linspace(2, 0.5, 16)
    patches = coords @ basis + mean                                          # (512 patches, 768)
    images = patches.view(128, 2, 2, 16, 16, 3).permute(0, 5, 1, 3, 2, 4).reshape(128, 3, 32, 32)
    assert torch.allclose(model.patchify(images).reshape(-1, 768), patches)
    model.fit_interface(images)
    with torch.no_grad():
        channels = model.patch_in(patches)
        std = channels.std(0)
        assert torch.allclose(model.patch_out(channels / std), patches, atol=1e-4)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_self_conditioned_step_reaches_every_parameter(amp):
    """The first pass runs under no_grad; inside autocast that must not starve any weight of gradient."""
    model, args = tiny(2)
    x, t, levels, ids = net.dummy_inputs(args, 3)
    autocast, _ = train.amp_setup(amp, torch.device("cpu"))
    with autocast:
        loss = train.flow_matching_loss(model, x.clamp(-1, 1), torch.randn_like(x), t, levels, ids,
                                        torch.ones(3)).mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.patch_in.weight.grad.abs().sum() > 0


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    class Args:
        lr, warmup, steps = 1e-3, 10, 110
    assert train.lr_at(0, Args) == pytest.approx(1e-4)
    assert train.lr_at(9, Args) == pytest.approx(1e-3)
    assert train.lr_at(60, Args) == pytest.approx(0.55e-3)
    assert train.lr_at(110, Args) == pytest.approx(1e-4)


def test_batch_ids_are_trimmed_to_the_longest_caption_rounded_up_to_8():
    args = argparse.Namespace(seed=0, batch_size=4, text_drop=0.0, text_encoder="own", long_first=0, relation_steps=0,
                              relation_every=1, count_steps=0)
    captions = ["a red circle.", "two blue squares and a green triangle.", "a circle.", "an orange square."]
    ids = net.tokenize(captions, 64)[None]                   # one caption kind, (1, 4, 64)
    data = (np.zeros((4, 8, 8, 3), np.uint8), ids, torch.zeros(4, 1), {}, {})
    _, batch_ids, _, _ = train.get_batch(0, args, data, 0, 1, torch.device("cpu"))
    longest = int((ids != net.PAD_ID).sum(-1).max())
    assert batch_ids.shape[1] == -(-longest // 8) * 8 < 64
    assert (batch_ids != net.PAD_ID).sum() == (ids != net.PAD_ID).sum()  # no real token is cut


def test_long_first_shows_only_the_long_captions_for_its_steps():
    args = argparse.Namespace(seed=0, batch_size=64, text_drop=0.0, text_encoder="own", long_first=3, relation_steps=0,
                              relation_every=1, count_steps=0)
    ids = torch.stack([torch.full((64, 8), 7), torch.full((64, 8), 9)])  # two caption kinds; the second is long
    data = (np.zeros((64, 8, 8, 3), np.uint8), ids, torch.zeros(64, 1), {"long": 1}, {})
    first = [train.get_batch(step, args, data, 0, 1, torch.device("cpu"))[1] for step in range(4)]
    assert all((batch == 9).all() for batch in first[:3])
    assert (first[3] == 7).any() and (first[3] == 9).any()


def test_relation_steps_show_only_scenes_with_a_relation_and_their_short_captions():
    """After 2 long-first steps, 3 relation steps: only the scenes listed as having a relation, each with
    its short caption, the same global batch split across ranks; then the mix again."""
    args = argparse.Namespace(seed=0, batch_size=8, text_drop=0.0, text_encoder="own", long_first=2, relation_steps=3,
                              relation_every=1, count_steps=0)
    n = 40
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)  # image i is i
    ids = torch.stack([torch.full((n, 8), 7), torch.full((n, 8), 9), torch.full((n, 8), 5)])  # alt, long, short
    relation = torch.tensor([3, 17, 21, 30])
    data = (images, ids, torch.zeros(n, 1), {"long": 1, "relation": 2}, {"relation": relation})
    shown = lambda x: set(((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist())  # the image indices of a batch
    for step in range(6):
        x, batch_ids, _, _ = train.get_batch(step, args, data, 0, 1, torch.device("cpu"))
        if step < 2:
            assert (batch_ids == 9).all()
        elif step < 5:
            assert (batch_ids == 5).all() and shown(x) <= set(relation.tolist())
            halves = [train.get_batch(step, args, data, rank, 2, torch.device("cpu"))[0] for rank in (0, 1)]
            assert sorted(torch.cat(halves)[:, 0, 0, 0].tolist()) == sorted(x[:, 0, 0, 0].tolist())
        else:
            assert not shown(x) <= set(relation.tolist()) and (batch_ids != 5).any()
    assert [train.phase(step, args) for step in range(6)] == ["long", "long", "relation", "relation", "relation", None]
    args.relation_every = 2  # interleaved: every second step after the long-first ones, three of them
    assert [train.phase(step, args) for step in range(10)] == ["long"] * 2 + ["relation", None] * 3 + [None, None]


def test_count_steps_follow_the_relation_steps_with_one_kind_scenes_and_brief_captions():
    """--count-steps: the step after each relation step shows only the scenes of several objects of one kind,
    each with its brief caption."""
    args = argparse.Namespace(seed=0, batch_size=8, text_drop=0.0, text_encoder="own", long_first=1, relation_steps=2,
                              relation_every=3, count_steps=2)
    n = 40
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)  # image i is i
    ids = torch.stack([torch.full((n, 8), k) for k in (7, 9, 5, 4)])  # alt, long, short, brief
    relation, count = torch.tensor([3, 17]), torch.tensor([8, 12, 33])
    data = (images, ids, torch.zeros(n, 1), {"long": 1, "relation": 2, "count": 3}, {"relation": relation, "count": count})
    shown = lambda x: set(((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist())
    assert [train.phase(s, args) for s in range(9)] == ["long", "relation", "count", None, "relation", "count", None, None, None]
    for step in (2, 5):
        x, batch_ids, _, _ = train.get_batch(step, args, data, 0, 1, torch.device("cpu"))
        assert (batch_ids == 4).all() and shown(x) <= set(count.tolist())


def test_batches_cover_every_image_once_per_epoch():
    seen = torch.cat([train.batch_indices(step, 7, 20, seed=1) for step in range(20)])  # 140 = 7 epochs of 20
    for epoch in range(7):
        assert sorted(seen[epoch * 20:(epoch + 1) * 20].tolist()) == list(range(20))
    assert torch.equal(train.batch_indices(5, 7, 20, seed=1), train.batch_indices(5, 7, 20, seed=1))


def test_competing_heads_share_each_context_token_out_among_the_queries():
    """compete: the weights of a context token over the queries and a sink (logit 0) sum to 1, so one
    query alone gets sigmoid(q.k / sqrt(d)) of each token; a masked token gives nothing; identical
    queries split a token between them instead of each taking it whole."""
    torch.manual_seed(0)
    attn = net.Attention(8, 8, heads=1, compete=True).double()
    with torch.no_grad():
        attn.out.weight.copy_(torch.eye(8)), attn.out.bias.zero_()
    x, c = torch.randn(1, 1, 8, dtype=torch.double), torch.randn(1, 5, 8, dtype=torch.double)
    q = attn.q_norm(attn.q(x))
    k, v = attn.kv(c).chunk(2, dim=-1)
    weights = torch.sigmoid(q @ attn.k_norm(k).transpose(-1, -2) / 8 ** 0.5)                      # (1, 1, 5)
    assert torch.allclose(attn(x, c), weights @ v)
    mask = torch.tensor([[True, True, False, True, True]])
    assert torch.allclose(attn(x, c, mask), (weights * mask) @ v)
    one, three = attn(x, c), attn(x.expand(1, 3, 8), c)                                            # the query 3 times
    shared = torch.softmax(torch.cat([(q @ attn.k_norm(k).transpose(-1, -2) / 8 ** 0.5).expand(1, 3, 5),
                                      torch.zeros(1, 1, 5, dtype=torch.double)], 1), 1)[:, :3]
    assert torch.allclose(three, shared @ v) and (shared[0, 0] < weights[0, 0]).all()
    assert torch.allclose(one, weights @ v)


def test_rotary_logits_depend_only_on_how_far_apart_two_tokens_are():
    """q.k after the rotary embedding is the same for a sequence and for that sequence moved 3 places
    on; at distance 0 it is the plain q.k."""
    x = torch.randn(2, 4, 6, 16, dtype=torch.double)
    moved = net.rotary(torch.cat([torch.randn(2, 4, 3, 16, dtype=torch.double), x], 2))[:, :, 3:]
    logits = net.rotary(x) @ net.rotary(x).transpose(-1, -2)
    assert torch.allclose(logits, moved @ moved.transpose(-1, -2), atol=1e-4)  # turned in float32
    assert torch.allclose(logits.diagonal(dim1=-2, dim2=-1), x.square().sum(-1), atol=1e-4)


def test_text_conv_and_rope_keep_padding_inert():
    """The caption's tokens do not change when padding is added (the convolution sees zeros past the end)."""
    model, _ = tiny(0, text_conv=3, text_rope=True)
    ids = net.tokenize(["a red circle and two blue squares."], 64)
    longest = int((ids != net.PAD_ID).sum())
    full, _ = model.text(ids)
    short, _ = model.text(ids[:, :longest])
    assert torch.allclose(full[:, :longest], short, atol=1e-5)
