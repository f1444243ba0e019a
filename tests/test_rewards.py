"""Each reward of 02_score.py moves the right way with each degradation of 01_caption.py."""
import numpy as np
import pytest
import torch

from conftest import stage

world, scoring = stage("01_caption"), stage("02_score")
N_SCENES = 48


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(11)
    return [world.sample_scene(rng, 32) for _ in range(N_SCENES)]


def degraded(scenes, seed=0, **strength):
    """The scenes rendered with the given degradations (all others off): uint8 [B, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    settings = []
    for _ in scenes:
        d = {"blur": 0.0, "noise": 0.0, "washout": 0.0, "clutter": 0, "specks": []}
        d.update(strength)
        d["specks"] = world.sample_specks(rng, d["clutter"], 32)
        settings.append(d)
    clean = np.stack([world.render(s, 32, d["specks"]) for s, d in zip(scenes, settings)])
    return world.degrade(clean, settings, rng)


def mean_reward(name, images, scenes):
    return float(scoring.REWARDS[name](images, [world.caption_short(s) for s in scenes]).mean())


LEVELS = {"blur": [0.0, 0.6, 1.0, 1.6], "noise": [0.0, 8.0, 20.0, 40.0],
          "washout": [0.0, 0.3, 0.5, 0.75], "clutter": [0, 3, 6, 9]}


@pytest.mark.parametrize("reward,degradation,direction", [
    ("sharpness", "blur", -1), ("low_noise", "noise", -1), ("colourfulness", "washout", -1),
    ("colourfulness", "clutter", +1),  # the hackable reward: clutter raises it ...
    ("alignment", "clutter", -1),      # ... at the cost of alignment
    ("alignment", "blur", -1), ("alignment", "noise", -1), ("alignment", "washout", -1),
])
def test_reward_is_monotone_in_its_degradation(scenes, reward, degradation, direction):
    """The mean over three draws of the degradations (where the specks fall, the noise), so that a
    saturated step (6 against 9 specks, both nearly always an unstated object) is not decided by one draw."""
    values = [np.mean([mean_reward(reward, degraded(scenes, seed, **{degradation: level}), scenes) for seed in range(3)])
              for level in LEVELS[degradation]]
    steps = np.diff(values) * direction
    assert (steps >= 0).all() and steps.sum() > 0, f"{reward} vs {degradation}: {values}"


OWN = {"sharpness": "blur", "low_noise": "noise", "colourfulness": "washout"}


@pytest.mark.parametrize("reward,degradation", [
    ("sharpness", "noise"), ("sharpness", "washout"), ("low_noise", "blur"), ("low_noise", "washout"),
    ("colourfulness", "noise"), ("colourfulness", "blur"),
])
def test_other_degradations_do_not_pass_for_quality(scenes, reward, degradation):
    """Another degradation may not raise a quality reward by more than 5% of the drop its own
    degradation causes (noise must not pass for sharpness, as in the calibration notes)."""
    clean = mean_reward(reward, degraded(scenes), scenes)
    own_worst = mean_reward(reward, degraded(scenes, **{OWN[reward]: LEVELS[OWN[reward]][-1]}), scenes)
    worst = mean_reward(reward, degraded(scenes, **{degradation: LEVELS[degradation][-1]}), scenes)
    assert worst - clean <= 0.05 * (clean - own_worst), f"{reward} rose from {clean:.3f} to {worst:.3f} with {degradation}"


def test_alignment_checks_the_caption(scenes):
    images = degraded(scenes)
    true = [world.caption_short(s) for s in scenes]
    assert scoring.alignment(images, true).tolist() == [1.0] * len(scenes)

    def recolour(caption, scene):
        colour = scene["objects"][0]["colour"]
        other = next(c for c in world.COLOURS if c != colour and c not in caption)
        return caption.replace(colour, other)

    def recount(caption, scene):
        colour, kind, n = world.groups_of(scene)[0]
        return caption.replace(world.counted(n, colour, kind), world.counted(n % 4 + 1, colour, kind), 1)

    for change in (recolour, recount):
        changed = [change(c, s) for c, s in zip(true, scenes)]
        scores = scoring.alignment(images, changed)
        assert (scores < 1).all(), change.__name__


def test_alignment_is_nan_when_the_caption_states_nothing(scenes):
    scores = scoring.alignment(degraded(scenes[:3]), ["img_0042.png", "", "geometric shapes"])
    assert torch.isnan(scores).all()


def test_a_failing_reward_gives_nan_not_a_crash():
    def fragile(images, captions):
        if any("bad" in c for c in captions):
            raise ValueError("cannot score")
        return torch.ones(len(images))

    images = np.zeros((5, 32, 32, 3), np.uint8)
    scores = scoring.score(fragile, images, ["ok", "bad", "ok", "ok", "bad"], batch_size=4)
    assert torch.isnan(scores).tolist() == [False, True, False, False, True]
    assert scores[~torch.isnan(scores)].tolist() == [1.0, 1.0, 1.0]


def test_every_colour_is_about_as_colourful():
    """One shape of each colour on the background scores about the same colourfulness, so that the top
    colourfulness bin is not one colour's (a model guided up on it would repaint the stated colours)."""
    images = np.tile(np.array(world.BACKGROUND, dtype=np.uint8), (len(world.COLOURS), 32, 32, 1))
    for image, rgb in zip(images, world.COLOURS.values()):
        image[11:21, 11:21] = rgb
    scores = scoring.colourfulness(torch.from_numpy(images))
    assert scores.max() / scores.min() < 1.1, dict(zip(world.COLOURS, scores.tolist()))
