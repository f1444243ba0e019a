#!/usr/bin/env bash
# The main job on the built-in shapes world: all seven stages in order, each writing into $OUT.
# MIRO (all rewards) and the unconditioned baseline get the same network, data and steps.
# WORLD picks the rung of the ladder (01_caption.py --world): one, clean or full (the default).
# Its time on a 2-core CPU: README, "The main job".
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
WORLD=${WORLD:-full}
# Per world: scenes, steps per run (batch 16), LONG: the first 1/LONG of the steps on long captions alone (0: none),
# PHASES: a quarter of the steps on relations, COUNT: a quarter on counts, SELF_COND: how often a step self-conditions,
# NET: network settings beside the tiny preset's (04_model.TextRIN's arguments), T_SCALE: the told t (all below).
case "$WORLD" in
  one)   SCENES=10000; DEFAULT_STEPS=1050; LONG=0; PHASES=0; COUNT=0; SELF_COND=0; NET=""; T_SCALE=1 ;;
  clean) SCENES=20000; DEFAULT_STEPS=2400; LONG=4; PHASES=1; COUNT=1; SELF_COND=0.5; NET="self_cond=image"; T_SCALE=0.85 ;;
  full)  SCENES=20000; DEFAULT_STEPS=5400; LONG=8; PHASES=1; COUNT=0; SELF_COND=0; NET="pixel_skip=true"; T_SCALE=1 ;;
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
# On clean half the steps self-condition on the clean-image estimate of a first pass (--self-cond 0.5, --net
# self_cond=image): a cell sees what the last sampling step drew there. On full it costs MIRO its colour-free
# objects ("a circle." fades) and a tenth of the steps' speed, so it is off there. On full the clean-image
# estimate may keep the grain of x_t (pixel_skip=true): without it no sample guided to low_noise 0 is grainy.
# t is shifted towards noise (--t-shift 3), where the layout is decided. On clean the first quarter of the steps
# shows only the long captions (--long-first; on full the first eighth), each object named with its cell: on the
# caption mix alone the network never learns which words name which cell. After it every third step
# (--relation-every 3, a quarter of all steps) shows a scene of two
# objects and the relation its caption states, nearly all at t > 0.9 (--relation-steps, --relation-objects 2):
# without them no run learned "left of", and as one block after the long captions the steps after it undid it.
# On clean the step after each relation step shows a scene of several objects of one kind, with its brief caption
# ("three squares.", --count-steps): the caption mix alone leaves counts half wrong.
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
RECIPE="--self-cond $SELF_COND ${NET:+--net $NET} --t-shift 3 --long-first $((LONG ? STEPS / LONG : 0)) \
  --relation-steps $((PHASES ? STEPS / 4 : 0)) --relation-every 3 --relation-objects 2 --count-steps $((COUNT ? STEPS / 4 : 0)) \
  --steps $STEPS --eval-every $EVAL"
OMP_NUM_THREADS=$THREADS python 05_train.py --out "$OUT" --run miro --overwrite $RECIPE \
  > "$OUT/miro_train.log" 2>&1 & miro=$!
OMP_NUM_THREADS=$THREADS python 05_train.py --out "$OUT" --run baseline --overwrite --rewards none $RECIPE
wait $miro || { tail -n 5 "$OUT/miro_train.log"; exit 1; }  # MIRO's log lines are in that file
# Guidance only at t <= 0.7: at the noisiest steps, text guidance pushes towards fewer objects than the
# unconditional average and empties one-object prompts (Kynkaanniemi et al. 2024, guidance in an interval).
# On clean the network is told t x 0.85 (06_sample.Sampling): the baseline's estimate keeps too little of an object
# whose colour the caption leaves open, and "a circle." can fade to nothing. On full, MIRO already draws more
# objects than stated, and the shift adds more.
SAMPLING="--cfg-max-t 0.7 --t-scale $T_SCALE"
python 06_sample.py  --out "$OUT" --run miro $SAMPLING                              # a grid of held-out captions
python 07_eval.py    --out "$OUT" $SAMPLING                                         # OUT/eval/report.md
