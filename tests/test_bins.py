"""Quantile binning of 03_bin.py against known answers."""
import numpy as np
import torch

from conftest import stage

binning = stage("03_bin")


def bins_of(scores, num_bins):
    return binning.assign_bins(scores, binning.fit_edges(scores, num_bins))


def test_continuous_scores_fill_equal_bins():
    for num_bins in (2, 5, 8, 13):
        scores = torch.randn(4000).exp()  # skewed, continuous
        populations = torch.bincount(bins_of(scores, num_bins), minlength=num_bins)
        assert (populations - 4000 / num_bins).abs().max() <= 0.02 * 4000 / num_bins, populations


def test_bins_are_monotone_in_the_score():
    scores = torch.rand(3000)
    bins = bins_of(scores, 5)
    order = scores.argsort()
    assert (bins[order].diff() >= 0).all() and bins.min() == 0 and bins.max() == 4


def test_big_ties_keep_the_extremes_at_level_0_and_1():
    # 40% score exactly 1.0 (like perfect alignment), 30% exactly 0.0, the rest in between.
    scores = torch.cat([torch.ones(400), torch.zeros(300), torch.rand(300) * 0.9 + 0.05])
    bins = bins_of(scores, 5)
    assert set(bins[:400].tolist()) == {4}, "the top tie must own the top bin"
    assert set(bins[400:700].tolist()) == {0}, "the bottom tie must be in the bottom bin"
    assert bins[700:].max() < 4 and len(set(bins.tolist())) >= 3
    order = scores.argsort()
    assert (bins[order].diff() >= 0).all()


def test_constant_reward_goes_to_the_middle_bin():
    assert set(bins_of(torch.full((100,), 3.0), 5).tolist()) == {2}


def test_nan_goes_to_the_middle_bin_and_is_ignored_by_the_edges():
    scores = torch.rand(1000)
    with_nan = scores.clone()
    with_nan[::10] = float("nan")
    edges = binning.fit_edges(with_nan, 4)
    assert torch.allclose(edges, binning.fit_edges(scores[torch.arange(1000) % 10 != 0], 4))
    assert set(binning.assign_bins(with_nan, edges)[::10].tolist()) == {1}


def test_scores_outside_the_calibration_range_are_clamped():
    edges = binning.fit_edges(torch.rand(500), 5)
    assert binning.assign_bins(torch.tensor([-5.0, 5.0]), edges).tolist() == [0, 4]


def test_spearman_matches_known_answers():
    x = np.arange(50.0)
    matrix = binning.spearman(np.stack([x, x**3, -x, np.r_[x[:25], x[:25]]], 1))
    assert np.allclose(matrix[0, 1], 1) and np.allclose(matrix[0, 2], -1)
    assert np.allclose(binning.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0, 2.5, 1])
