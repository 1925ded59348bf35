#!/usr/bin/env bash
# CPU-sized reproduction of the paper's CIFAR-10 comparison (Fig. 3a,b; Sec. 5.2) on the
# offline CIFAR-10 image folder, about an hour on a 2-core CPU:
#
#   1. short learning-rate sweeps for SGD (batch 128) and KFC-pre (batch 512), each job with
#      about the same training time; the best lr is the one with the lowest final TRAINING
#      error (the paper's protocol, on a much smaller budget);
#   2. one run of each at its best lr, for SGD_EPOCHS and KFC_EPOCHS epochs;
#   3. the figures (error and NLL against training wall-clock and against iterations) and
#      the markdown report (time and iterations to reach given errors, speed-up ratios).
#
# Usage: scripts/reproduce_cpu.sh            (or: make reproduce-cpu)
# Environment: KFCRUN_CIFAR10_DIR (data), OUT (output dir), SGD_EPOCHS, KFC_EPOCHS,
#              KFC_DAMPING, THREADS, KFCRUN / PYTHON (executables).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KFCRUN="${KFCRUN:-$ROOT/.venv/bin/kfcrun}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DATA="${KFCRUN_CIFAR10_DIR:-$ROOT/../shared/data/cifar10}"
OUT="${OUT:-$ROOT/outputs/reproduce_cpu/$(date +%Y-%m-%d_%H-%M-%S)}"
SGD_EPOCHS="${SGD_EPOCHS:-40}"     # 15,600 iterations at batch 128
KFC_EPOCHS="${KFC_EPOCHS:-20}"     # 1,940 iterations at batch 512
KFC_DAMPING="${KFC_DAMPING:-0.01}" # see the note in the report: 1e-3 (the paper's) trains less stably here
THREADS="${THREADS:-2}"

if [ ! -d "$DATA/train" ] && [ ! -d "$DATA/cifar-10-batches-py" ]; then
  echo "reproduce_cpu: no CIFAR-10 at $DATA; fix: set KFCRUN_CIFAR10_DIR=<dir with train/ and test/>" >&2
  exit 2
fi
mkdir -p "$OUT"
COMMON=(dataset.root="$DATA" trainer.progress=false trainer.threads="$THREADS")
KFC_SETTINGS=(optimizer.damping="$KFC_DAMPING" optimizer.init_examples=5120)
started=$(date +%s)
say() { printf '\n[reproduce_cpu %4d min] %s\n' $(( ($(date +%s) - started) / 60 )) "$*"; }

best_lr() {  # prints the best job's learning rate of a sweep (lowest final training error)
  "$PYTHON" "$ROOT/scripts/sweep_table.py" "$1" --json "$1/table.json" >&2
  "$PYTHON" -c 'import json, sys; print(next(j["lr"] for j in json.load(open(sys.argv[1]))["jobs"] if j.get("best")))' \
    "$1/table.json"
}

say "1/4 learning-rate sweep, SGD at batch 128 (800 iterations per job)"
"$KFCRUN" -m experiment=cifar10_sgd "${COMMON[@]}" trainer.max_iters=800 trainer.max_epochs=null \
  trainer.eval_every=800 trainer.checkpoint_every=null 'optimizer.lr=0.01,0.003,0.001' \
  hydra.sweep.dir="$OUT/sweep_sgd"
SGD_LR=$(best_lr "$OUT/sweep_sgd")

say "1/4 learning-rate sweep, KFC-pre at batch 512 (120 iterations per job)"
"$KFCRUN" -m experiment=cifar10_kfc "${COMMON[@]}" "${KFC_SETTINGS[@]}" trainer.max_iters=120 \
  trainer.max_epochs=null trainer.eval_every=120 trainer.checkpoint_every=null 'optimizer.lr=0.3,0.1,0.03' \
  hydra.sweep.dir="$OUT/sweep_kfc"
KFC_LR=$(best_lr "$OUT/sweep_kfc")
echo "best learning rates: SGD $SGD_LR, KFC-pre $KFC_LR"

say "2/4 SGD, batch 128, lr $SGD_LR, $SGD_EPOCHS epochs"
"$KFCRUN" experiment=cifar10_sgd "${COMMON[@]}" optimizer.lr="$SGD_LR" trainer.max_iters=null \
  trainer.max_epochs="$SGD_EPOCHS" trainer.eval_every=390 hydra.run.dir="$OUT/sgd"

say "3/4 KFC-pre, batch 512, lr $KFC_LR, $KFC_EPOCHS epochs"
"$KFCRUN" experiment=cifar10_kfc "${COMMON[@]}" "${KFC_SETTINGS[@]}" optimizer.lr="$KFC_LR" \
  trainer.max_iters=null trainer.max_epochs="$KFC_EPOCHS" trainer.eval_every=97 hydra.run.dir="$OUT/kfc"

say "4/4 figures and report"
"$PYTHON" "$ROOT/scripts/make_figures.py" "$OUT/sgd" "$OUT/kfc" --kind both --out "$OUT/figures"
"$PYTHON" "$ROOT/scripts/report.py" "$OUT/sgd" "$OUT/kfc" --out "$OUT/report.md"
say "done: $OUT (report.md, figures/)"
