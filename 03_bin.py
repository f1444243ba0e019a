"""Stage 03: bin every reward into B equal-population quantile bins.

Raw rewards live on unrelated scales (a CLIP score near 30, an aesthetic score near 5).
MIRO makes them comparable by quantiles: per reward, the B-1 interior
edges are the 1/B, 2/B, ... quantiles of the scores on a calibration subset, so each bin
holds 1/B of the images, and bin b is shown to the network as the level b / (B - 1) in
[0, 1]. Fitting on a subset is what a large dataset needs; on the shapes world the
default subset is the whole dataset.

Why B = 5 by default: the top bin (the best 20%) of each image-quality reward falls
inside the images that escaped its degradation (each degradation spares at least half
the images), so "level 1" means "not degraded", not an arbitrary slice of clean images;
the joint top cell of all four rewards still holds some images (03 prints how many), so the
default target s+ = [1, ..., 1] is in distribution; five levels are enough for the sweeps of 06/07.

Ties, constants, NaN:
  - a score equal to an edge goes to the upper bin;
  - a large tie (e.g. the many images with alignment exactly 1.0) makes some edges equal;
    the bins between equal edges would stay empty, so the bins that can hold images are
    spread evenly over 0..B-1: the worst images keep level 0 and the best level 1;
  - a reward that is constant on the calibration subset carries no signal: every image
    gets the middle bin, and a warning says so;
  - a NaN score (the reward failed on that image) gets the middle bin: "unknown" is
    treated as typical. Edges are fitted on the finite scores only.

    python 03_bin.py                    # B = 5
    python 03_bin.py --bins 8 --calib 5000

Reads OUT/scores.pt; writes OUT/bins.pt (names, num_bins, edges float [R, B+1],
bins int64 [N, R] in 0..B-1, calib_idx, dataset copied from scores.pt, version, config). Prints the edges and
populations of every reward and the reward-by-reward Spearman correlations.
"""
import argparse
import importlib
import os
import sys

import numpy as np
import torch

world = importlib.import_module("01_caption")  # file helpers
STAGE = "03_bin.py"  # in every error line of this stage
VERSION = 1


def fit_edges(calib_scores, num_bins):
    """Quantile edges of the finite calibration scores: [min, q(1/B), ..., q((B-1)/B), max]."""
    finite = calib_scores[torch.isfinite(calib_scores)].double()
    if len(finite) == 0:
        return None
    return torch.quantile(finite, torch.linspace(0, 1, num_bins + 1, dtype=torch.double))


def bin_table(edges):
    """Map from the raw bin (how many interior edges a score reaches) to the bin index.
    Raw bin k < B-1 can hold images only if edges[k] < edges[k+1]; the top one always can.
    Those that can are spread evenly over 0..B-1 (identity when no edges tie)."""
    num_bins = len(edges) - 1
    usable = [k for k in range(num_bins - 1) if edges[k] < edges[k + 1]] + [num_bins - 1]
    if len(usable) == 1:  # constant reward: no signal, middle bin
        return torch.full((num_bins,), (num_bins - 1) // 2, dtype=torch.long)
    table = torch.empty(num_bins, dtype=torch.long)
    for k in range(num_bins):
        j = max([i for i, u in enumerate(usable) if u <= k], default=0)  # below the calibration min -> lowest
        table[k] = round(j * (num_bins - 1) / (len(usable) - 1))
    return table


def assign_bins(scores, edges):
    """Scores [N] -> bin indices int64 [N] in 0..B-1 (NaN -> middle bin)."""
    num_bins = len(edges) - 1
    raw = torch.searchsorted(edges[1:-1].contiguous(), scores.double().contiguous(), right=True)  # (N,) in 0..B-1
    bins = bin_table(edges)[raw]
    bins[~torch.isfinite(scores)] = (num_bins - 1) // 2
    return bins


def spearman(scores):
    """Rank correlation of every pair of columns of [N, R], over images where both are finite."""
    R = scores.shape[1]
    out = np.eye(R)
    for i in range(R):
        for j in range(i + 1, R):
            ok = np.isfinite(scores[:, i]) & np.isfinite(scores[:, j])
            ranks = [average_ranks(scores[ok, c]) for c in (i, j)]
            constant = ok.sum() <= 2 or min(np.ptp(r) for r in ranks) == 0  # no rank order: NaN, no warning
            out[i, j] = out[j, i] = np.nan if constant else np.corrcoef(*ranks)[0, 1]
    return out


def average_ranks(values):
    """Ranks 0..n-1, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, ranks) / counts)[inverse]


def main():
    parser = world.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="working folder (reads scores.pt, writes bins.pt)")
    parser.add_argument("--bins", type=world.number(int, 2), default=5, help="number of bins B per reward (>= 2)")
    parser.add_argument("--calib", type=world.count, default=50000, help="size of the calibration subset (all if larger than N)")
    parser.add_argument("--seed", type=world.natural, default=0, help="seed of the calibration subset")
    args = parser.parse_args()
    if args.calib < args.bins:
        sys.exit(f"{STAGE}: error: --calib must be at least --bins (got {args.calib} < {args.bins})")
    world.prepare_out(args.out, STAGE)
    data = world.load_pt(os.path.join(args.out, "scores.pt"), ["names", "scores"], STAGE, "02_score.py")
    names, scores = data["names"], data["scores"]
    if not (torch.is_tensor(scores) and scores.ndim == 2 and scores.shape[1] == len(names)):
        sys.exit(f"{STAGE}: error: scores.pt holds no [N, {len(names)}] score tensor: re-run 02_score.py")
    images_path = os.path.join(args.out, "images.npy")
    if os.path.exists(images_path):
        n_images = len(world.load_images(images_path, STAGE))
        if n_images != len(scores):
            sys.exit(f"{STAGE}: error: scores.pt has {len(scores)} images but images.npy has {n_images}: re-run 02_score.py")

    N, B = len(scores), args.bins
    generator = torch.Generator().manual_seed(args.seed)
    calib_idx = torch.randperm(N, generator=generator)[:args.calib].sort().values
    edges, bins = torch.empty(len(names), B + 1, dtype=torch.double), torch.empty(N, len(names), dtype=torch.long)
    for r, name in enumerate(names):
        fitted = fit_edges(scores[calib_idx, r], B)
        if fitted is None:
            sys.exit(f"{STAGE}: error: reward {name} is NaN on every calibration image: check it and re-run 02_score.py")
        edges[r], bins[:, r] = fitted, assign_bins(scores[:, r], fitted)

    out = {"names": names, "num_bins": B, "edges": edges, "bins": bins, "calib_idx": calib_idx,
           "dataset": data.get("dataset"), "version": VERSION, "config": world.file_config(args)}
    world.save_atomic(out, os.path.join(args.out, "bins.pt"))

    print(f"binned {N} images x {len(names)} rewards into B = {B} bins (calibrated on {len(calib_idx)}) -> {args.out}/bins.pt")
    for r, name in enumerate(names):
        populations = torch.bincount(bins[:, r], minlength=B).tolist()
        nan = int((~torch.isfinite(scores[:, r])).sum())
        print(f"\n{name}: edges " + " ".join(f"{float(e):.4g}" for e in edges[r]))
        print(f"  images per bin (level 0 -> 1): {populations}" + (f", {nan} NaN in the middle bin" if nan else ""))
        if len(set(bin_table(edges[r]).tolist())) < B:
            note = "constant: no signal, all in the middle bin" if edges[r, 0] == edges[r, -1] else \
                "tied edges merged, the remaining bins spread over 0..B-1"
            print(f"  note: {note}")
    matrix = spearman(scores.numpy())
    print("\nSpearman rank correlation between rewards:")
    print(" " * 14 + "".join(f"{name[:10]:>11}" for name in names))
    for name, row in zip(names, matrix):
        print(f"{name[:13]:>14}" + "".join(f"{v:11.2f}" for v in row))
    top = (bins == B - 1).all(1).sum()
    print(f"\nimages in the top bin of every reward (the default target s+ = 1): {int(top)} of {N}")


if __name__ == "__main__":
    main()
