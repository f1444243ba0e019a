#!/usr/bin/env bash
# The main job on the built-in shapes world: all seven stages in order, each writing into $OUT.
# MIRO (all rewards) and the unconditioned baseline get the same network, data and steps.
# WORLD picks the rung of the ladder (01_caption.py --world): one, clean or full (the default).
# Its time on a 2-core CPU: README, "The main job".
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
WORLD=${WORLD:-full}
case "$WORLD" in            # scenes, and training steps per run (batch 16)
  one)   SCENES=10000; DEFAULT_STEPS=1150 ;;
  clean) SCENES=20000; DEFAULT_STEPS=2400 ;;
  full)  SCENES=20000; DEFAULT_STEPS=3600 ;;
  *) echo "run.sh: error: WORLD=$WORLD: use one, clean or full" >&2; exit 2 ;;
esac
STEPS=${STEPS:-$DEFAULT_STEPS}
EVAL=$((STEPS / 6))             # evaluations logged during training: the convergence curves

python 01_caption.py --out "$OUT" --world "$WORLD" --n "$SCENES"                   # 4 captions each
python 02_score.py   --out "$OUT"                                                  # 4 offline rewards per image
python 03_bin.py     --out "$OUT"                                                  # 5 equal-population bins per reward
python 04_model.py   --preset tiny                                                 # the network: size, FLOPs, self-checks
# MIRO and the baseline train side by side. A network this small keeps neither a GPU nor two CPU
# cores busy: on a GPU it is bound by kernel launches, and on a CPU one run on one core gets more
# than half the images per second of one run on two. So each run gets half the cores.
# No latent self-conditioning (--self-cond 0): at this budget its extra pass costs more steps than it gives.
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
OMP_NUM_THREADS=$THREADS python 05_train.py --out "$OUT" --run miro --overwrite --self-cond 0 --steps "$STEPS" --eval-every "$EVAL" \
  > "$OUT/miro_train.log" 2>&1 & miro=$!
OMP_NUM_THREADS=$THREADS python 05_train.py --out "$OUT" --run baseline --overwrite --rewards none --self-cond 0 --steps "$STEPS" --eval-every "$EVAL"
wait $miro || { tail -n 5 "$OUT/miro_train.log"; exit 1; }  # MIRO's log lines are in that file
python 06_sample.py  --out "$OUT" --run miro                                       # a grid of held-out captions
python 07_eval.py    --out "$OUT"                                                  # OUT/eval/report.md
