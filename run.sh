#!/usr/bin/env bash
# The main job on the built-in shapes world: every stage in order, each writing into $OUT.
# Times are for a 2-core laptop CPU (see README, "Benchmarks").
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}

python 01_caption.py --out "$OUT"   # 20,000 scenes with alt/long/short captions   ~20 s
python 02_score.py   --out "$OUT"   # 4 offline rewards per image                  ~20 s
python 03_bin.py     --out "$OUT"   # B = 5 equal-population bins per reward        ~3 s
