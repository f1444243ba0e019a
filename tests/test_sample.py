"""06_sample.py: the guidance and the integrator against known answers, the CLI, bad input."""
import argparse
import os
import shutil

import pytest
import torch

from conftest import fails_in_one_line, run, stage

net, sampler = stage("04_model"), stage("06_sample")


# The guided velocity comes from one forward of 2B rows, the references below from forwards of B
# rows. Those round differently (other matmul blocking), and w multiplies the difference: in
# float32 a fixed tolerance passes on one CPU and fails on another. In float64 the two differ by
# about 1e-15 per forward, so the guided result is off by at most (1 + 2w) times that, and the
# tolerance below holds on any kernel while a wrong formula is off by more than 1e-2.
def tolerance(cfg):
    return dict(atol=(1 + 2 * abs(cfg)) * 1e-10, rtol=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m, _ = net.build("tiny", num_rewards=3)
    with torch.no_grad():  # zero-initialised layers would hide the self-conditioning path
        m.prev_proj.weight.normal_(0, 0.02)
    return m.double().eval()


def inputs(batch=3):
    torch.manual_seed(1)
    ids = net.tokenize(["a red circle.", "two blue squares.", "a green triangle."][:batch], 64)
    s_plus, s_minus = torch.rand(batch, 3, dtype=torch.float64), torch.rand(batch, 3, dtype=torch.float64)
    return torch.randn(batch, 3, 32, 32, dtype=torch.float64), ids, s_plus, s_minus


def t_(value, batch=3):
    return torch.full((batch,), value, dtype=torch.float64)


@torch.no_grad()
def test_cfg_zero_is_the_conditional_velocity(model):
    x, ids, s_plus, s_minus = inputs()
    guided = sampler.Guided(model, ids, s_plus, s_minus, 0.0, "keep")
    direct, latents = model(x, t_(0.7), s_plus, ids)
    torch.testing.assert_close(guided(x, 0.7), direct, **tolerance(0))
    direct2, _ = model(x, t_(0.4), s_plus, ids, prev_latents=latents)  # self-conditioned 2nd call
    torch.testing.assert_close(guided(x, 0.4), direct2, **tolerance(0))


@torch.no_grad()
def test_image_self_cond_carries_each_branchs_estimate_to_the_next_call():
    """self_cond="image": each call hands the network the clean-image estimate of its own branch's
    previous call (x_t - t v of the unguided velocities), as training hands it the first pass's."""
    torch.manual_seed(0)
    m, _ = net.build("tiny", num_rewards=3, self_cond="image")
    with torch.no_grad():
        m.prev_image_in.weight.normal_(0, 0.01)
    m = m.double().eval()
    x, ids, s_plus, s_minus = inputs()
    guided = sampler.Guided(m, ids, s_plus, s_minus, 2.0, "keep")
    guided(x, 0.7)
    estimates = [m.estimate(x, m(x, t_(0.7), s, ids)[0], t_(0.7)) for s in (s_plus, s_minus)]
    v_pos, v_neg = (m(x, t_(0.4), s, ids, prev_image=e)[0] for s, e in zip((s_plus, s_minus), estimates))
    torch.testing.assert_close(guided(x, 0.4), v_pos + 2.0 * (v_pos - v_neg), **tolerance(2.0))
    assert (v_pos - m(x, t_(0.4), s_plus, ids)[0]).abs().max() > 1e-3  # the estimate changed the velocity


@torch.no_grad()
@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_equal_targets_give_the_conditional_velocity_for_any_cfg(model, cfg):
    x, ids, s_plus, _ = inputs()
    guided = sampler.Guided(model, ids, s_plus, s_plus.clone(), cfg, "keep")
    torch.testing.assert_close(guided(x, 0.5), model(x, t_(0.5), s_plus, ids)[0], **tolerance(cfg))


@torch.no_grad()
@pytest.mark.parametrize("cfg", [2.0, 7.5])
def test_guidance_is_eq3_with_both_branches(model, cfg):
    x, ids, s_plus, s_minus = inputs()
    v_pos = model(x, t_(0.3), s_plus, ids)[0]
    v_neg = model(x, t_(0.3), s_minus, ids)[0]
    assert (v_pos - v_neg).abs().max() > 1e-2  # the targets differ enough for a wrong formula to show
    torch.testing.assert_close(sampler.Guided(model, ids, s_plus, s_minus, cfg, "keep")(x, 0.3), v_pos + cfg * (v_pos - v_neg),
                               **tolerance(cfg))
    empty = net.tokenize([""] * 3, 64)  # neg_text "drop" (the default): the negative branch loses the caption too
    v_drop = model(x, t_(0.3), s_minus, empty)[0]
    torch.testing.assert_close(sampler.Guided(model, ids, s_plus, s_minus, cfg, "drop")(x, 0.3),
                               v_pos + cfg * (v_pos - v_drop), **tolerance(cfg))


@torch.no_grad()
def test_cfg_max_t_leaves_the_noisier_steps_unguided(model):
    """Guidance only at t <= cfg_max_t: eq. 3 at t = 0.3, the conditional velocity at t = 0.8."""
    x, ids, s_plus, s_minus = inputs()
    guided = sampler.Guided(model, ids, s_plus, s_minus, 2.0, "keep", cfg_max_t=0.5)
    torch.testing.assert_close(guided(x, 0.8), model(x, t_(0.8), s_plus, ids)[0], **tolerance(0))
    v_pos, v_neg = model(x, t_(0.3), s_plus, ids)[0], model(x, t_(0.3), s_minus, ids)[0]
    guided.latents = None  # as a first call: no self-conditioning latents
    torch.testing.assert_close(guided(x, 0.3), v_pos + 2.0 * (v_pos - v_neg), **tolerance(2.0))


@torch.no_grad()
@pytest.mark.parametrize("t", [0.5, 0.06])
def test_t_scale_keeps_the_networks_estimate_told_a_smaller_t(model, t):
    """With t_scale, the network is told t * t_scale and the velocity leads from x_t at the true t to the
    clean-image estimate it made: x_t - t v = the estimate of the network told t * t_scale (at t = 0.06 the
    told t is below T_MIN, where x-prediction divides by T_MIN)."""
    assert model.prediction == "x"
    x, ids, s_plus, s_minus = inputs()
    told = t * 0.5
    v_told = model(x, t_(told), s_plus, ids)[0]
    estimate = x - max(told, net.T_MIN) * v_told
    v = sampler.Guided(model, ids, s_plus, s_minus, 0.0, "keep", t_scale=0.5)(x, t)
    # t reaches the velocity in float32, as it reaches the network: exact to float32's rounding of t
    torch.testing.assert_close(x - max(t, net.T_MIN) * v, estimate, atol=1e-6, rtol=0)
    assert (v - model(x, t_(t), s_plus, ids)[0]).abs().max() > 1e-3  # told the true t, it would differ


def test_t_scale_outside_0_1_is_refused_in_one_line(tmp_path):
    fails_in_one_line("06_sample.py", "--out", tmp_path, "--t-scale", 0, expect=["--t-scale", "> 0.0"])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_a_constant_velocity_field_integrates_exactly(method):
    noise, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0 = sampler.integrate(lambda x, t: c, noise, steps=7, method=method)
    torch.testing.assert_close(x0, noise - c)  # x(0) = x(1) - integral of c over [0, 1]


def test_a_linear_field_has_the_known_discretisation_error():
    """dx/dt = a x from t = 1 down to 0: exact x(0) = x(1) exp(-a). Euler multiplies by
    (1 - a h) each step; Heun by 1 - a h + (a h)^2 / 2 (its last step to t = 0 is Euler)."""
    a, n = 1.3, 10
    h, x1 = 1 / n, torch.ones(1, 1, 1, 1, dtype=torch.float64)
    euler = sampler.integrate(lambda x, t: a * x, x1, n, "euler").item()
    heun = sampler.integrate(lambda x, t: a * x, x1, n, "heun").item()
    assert euler == pytest.approx((1 - a * h) ** n, rel=1e-6)
    assert heun == pytest.approx((1 - a * h + (a * h) ** 2 / 2) ** (n - 1) * (1 - a * h), rel=1e-6)
    exact = torch.tensor(-a).exp().item()
    assert abs(heun - exact) < abs(euler - exact) / 5


def test_best_of_returns_the_best_scoring_candidate():
    candidates = torch.arange(2 * 4).view(2, 4, 1, 1, 1).expand(2, 4, 2, 2, 3).to(torch.uint8)
    scores = torch.tensor([[0.1, 0.9, float("nan"), 0.3], [2.0, -1.0, 0.5, 1.9]])
    best, index = sampler.best_of(candidates, scores)
    assert index.tolist() == [1, 0]
    assert best[0, 0, 0, 0] == 1 and best[1, 0, 0, 0] == 4


def test_targets_by_order_and_by_name():
    names = ["alignment", "sharpness", "colourfulness"]
    assert sampler.parse_targets(None, names, 1.0) == [1.0, 1.0, 1.0]
    assert sampler.parse_targets("1,0.5,0", names, 1.0) == [1.0, 0.5, 0.0]
    assert sampler.parse_targets("sharpness=0.625", names, 1.0) == [1.0, 0.625, 1.0]


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def trained(two_runs):
    return two_runs


def test_sampling_writes_samples_and_a_grid(trained):
    (trained / "prompts.txt").write_text("a red circle.\n\n  two blue squares.\n")
    run("06_sample.py", "--out", trained, "--run", "miro", "--prompts", trained / "prompts.txt", "--steps", 3,
        "--pos", "sharpness=0.5", "--cfg", 2)
    samples = torch.load(trained / "runs" / "miro" / "samples.pt", weights_only=True)
    assert samples["images"].shape == (2, 32, 32, 3) and samples["images"].dtype == torch.uint8
    assert samples["prompts"] == ["a red circle.", "two blue squares."]
    assert samples["s_plus"].tolist() == [[1.0, 0.5, 1.0, 1.0]] * 2 and samples["s_minus"].sum() == 0
    assert samples["cfg"] == 2 and samples["steps"] == 3 and (trained / "runs" / "miro" / "samples.png").exists()


def test_isolate_and_interpolate_targets():
    names = ["alignment", "sharpness", "low_noise", "colourfulness"]
    args = argparse.Namespace(pos=None, neg=None, isolate="sharpness", interpolate=None, alphas=3)
    assert sampler.targets_for(args, names) == [("sharpness only", [1.0] * 4, [1.0, 0.0, 1.0, 1.0])]
    args.isolate, args.interpolate = None, "sharpness,colourfulness"
    rows = sampler.targets_for(args, names)
    assert [[row[1][1], row[1][3]] for row in rows] == [[0, 1], [0.5, 0.5], [1, 0]]
    assert all(row[2] == [0.0] * 4 for row in rows)


def test_best_of_and_the_baseline_from_the_command_line(trained):
    common = ["--out", trained, "--n", 2, "--steps", 2]
    result = run("06_sample.py", *common, "--best-of", 3, "--select", "colourfulness")
    assert "best of 3" in result.stdout
    run("06_sample.py", *common, "--run", "baseline")  # no rewards: guided by the text
    assert torch.load(trained / "runs" / "baseline" / "samples.pt", weights_only=True)["s_plus"].shape == (2, 0)


def test_bad_input_fails_in_one_line(trained, tmp_path):
    out = ["--out", trained, "--steps", 1, "--n", 1]
    fails_in_one_line("06_sample.py", *out, "--pos", "aesthetic=1", expect=["unknown reward", "aesthetic"])
    names = ["alignment", "sharpness", "low_noise", "colourfulness"]
    for spec, words in [("sharpness=1.5", ["outside [0, 1]"]), ("0,0", ["2 levels", "4 rewards"]),
                        ("sharpness=high", ["cannot read"])]:
        with pytest.raises(SystemExit) as stop:  # the same one-line exit, without a process each
            sampler.parse_targets(spec, names, 1.0)
        assert all(word in str(stop.value) for word in words) and "\n" not in str(stop.value)
    (tmp_path / "empty.txt").write_text("\n  \n")
    fails_in_one_line("06_sample.py", *out, "--prompts", tmp_path / "empty.txt", expect=["no prompt"])
    fails_in_one_line("06_sample.py", *out, "--run", "nothing", expect=["05_train.py"])
    other = tmp_path / "other"  # a bins.pt whose rewards are not the run's (files linked, not copied)
    shutil.copytree(trained, other, copy_function=os.symlink)
    bins = torch.load(other / "bins.pt", weights_only=True)
    bins["names"] = ["alignment", "aesthetic", "low_noise", "colourfulness"]
    (other / "bins.pt").unlink()
    torch.save(bins, other / "bins.pt")
    fails_in_one_line("06_sample.py", "--out", other, "--steps", 1, "--n", 1, expect=["sharpness", "bins.pt", "05_train.py"])


@pytest.mark.parametrize("change", ["mistyped setting", "unknown setting", "missing weights"])
def test_a_checkpoint_of_no_network_of_this_code_is_one_line(trained, tmp_path, change):
    """A checkpoint whose network settings or weights this code cannot rebuild stops 06 in one line."""
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken, copy_function=os.symlink)  # links: the checkpoints are large
    path = broken / "runs" / "miro" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    if change == "mistyped setting":
        ckpt["model_args"]["num_latents"] = "many"
    elif change == "unknown setting":
        ckpt["model_args"]["depth"] = 3
    else:
        ckpt["ema"].pop(next(iter(ckpt["ema"])))
    path.unlink()
    torch.save(ckpt, path)
    fails_in_one_line("06_sample.py", "--out", broken, "--steps", 1, "--n", 1,
                      expect=["ckpt.pt does not hold a network", "05_train.py"])
