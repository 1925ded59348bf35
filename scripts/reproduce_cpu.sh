#!/usr/bin/env bash
# CPU-sized reproduction of the paper's CIFAR-10 comparison (Fig. 3a,b; Sec. 5.2) on the
# offline CIFAR-10 image folder, about an hour on a 2-core CPU:
#
#   1. short sweeps, each job with about the same training time: SGD (batch 128) over the
#      learning rate, KFC-pre (batch KFC_BATCH, 512) over the learning rate and the damping (the paper's
#      gamma = 1e-3 and the gamma = 1 that worked better here); the best setting is the one
#      with the lowest final TRAINING error (the paper's protocol, on a much smaller budget;
#      sweeps much shorter than these favour large learning rates: 120 KFC-pre iterations
#      picked lr 0.1, which trains worse over 20 epochs than the lr 0.03 that 300 pick);
#   2. one run of each at its best lr, for SGD_EPOCHS and KFC_EPOCHS epochs;
#   3. the figures (error and NLL against training wall-clock and against iterations) and
#      the markdown report (time and iterations to reach given errors, speed-up ratios).
#
# Usage: scripts/reproduce_cpu.sh            (or: make reproduce-cpu)
# Environment: KFCRUN_CIFAR10_DIR (data), OUT (output dir), SGD_EPOCHS, KFC_EPOCHS, THREADS,
#              KFCRUN / PYTHON (executables); SGD_LR, KFC_LR and KFC_DAMPING all set: skip the
#              sweeps and run steps 2-4 with these (e.g. the settings outputs/results/cifar10_cpu picked);
#              KFC_BATCH (KFC-pre's batch, default the paper's 512; its sweep keeps the examples of 300
#              batch-512 iterations and its evaluations one per 97 x 512 examples), KFC_LR_GRID and
#              KFC_DAMPING_GRID (the KFC-pre sweep's values, comma-separated; defaults: the batch-512 grid).
#              On a CPU KFC-pre is faster at batch 128: KFC_BATCH=128 KFC_LR_GRID=0.03,0.01
#              KFC_DAMPING_GRID=1.0,0.3 (or KFC_LR=0.01 KFC_DAMPING=1.0) gave 2.0-2.6x SGD's speed against
#              1.1-1.2x at 512 (outputs/results/issue13/batch128).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KFCRUN="${KFCRUN:-$ROOT/.venv/bin/kfcrun}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${OUT:-$ROOT/outputs/reproduce_cpu/$(date +%Y-%m-%d_%H-%M-%S)}"
SGD_EPOCHS="${SGD_EPOCHS:-40}"     # 15,600 iterations at batch 128
KFC_EPOCHS="${KFC_EPOCHS:-20}"     # 1,940 iterations at batch 512
THREADS="${THREADS:-2}"
KFC_BATCH="${KFC_BATCH:-512}"
KFC_LR_GRID="${KFC_LR_GRID:-0.1,0.03}"
KFC_DAMPING_GRID="${KFC_DAMPING_GRID:-0.001,1.0}"
if ! [[ "$KFC_BATCH" =~ ^[1-9][0-9]*$ ]] || (( 153600 % KFC_BATCH != 0 )); then
  echo "reproduce_cpu: KFC_BATCH=$KFC_BATCH must be a whole number dividing 153,600 (the examples per KFC-pre sweep job); fix: e.g. KFC_BATCH=128 or 512" >&2
  exit 2
fi
KFC_SWEEP_ITERS=$(( 153600 / KFC_BATCH ))   # 300 at batch 512
KFC_EVAL_EVERY=$(( (97 * 512 + KFC_BATCH / 2) / KFC_BATCH ))  # 97 at batch 512 (one epoch), rounded

given=0
for setting in SGD_LR KFC_LR KFC_DAMPING; do [[ -n "${!setting:-}" ]] && given=$((given + 1)); done
if (( given == 1 || given == 2 )); then
  echo "reproduce_cpu: set all of SGD_LR, KFC_LR and KFC_DAMPING to skip the sweeps, or none of them" >&2
  exit 2
fi
. "$ROOT/scripts/cifar10_dir.sh" reproduce_cpu
mkdir -p "$OUT"
COMMON=(dataset.root="$DATA" trainer.progress=false trainer.threads="$THREADS")
KFC_SETTINGS=(optimizer.init_examples=5120 trainer.batch_size="$KFC_BATCH")
started=$(date +%s)
say() { printf '\n[reproduce_cpu %4d min] %s\n' $(( ($(date +%s) - started) / 60 )) "$*"; }

best_setting() {  # prints the best job's value of config key $2 (lowest final training error)
  "$PYTHON" "$ROOT/scripts/sweep_table.py" "$1" --json "$1/table.json" >&2
  "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
from omegaconf import OmegaConf
best = next(j for j in json.load(open(f"{sys.argv[1]}/table.json"))["jobs"] if j.get("best"))
print(OmegaConf.select(OmegaConf.load(f"{best['path']}/config.yaml"), sys.argv[2]))
PY
}

if (( given == 3 )); then
  say "1/4 sweeps skipped: SGD_LR, KFC_LR and KFC_DAMPING given"
else
  say "1/4 learning-rate sweep, SGD at batch 128 (2,400 iterations per job)"
  "$KFCRUN" -m experiment=cifar10_sgd "${COMMON[@]}" trainer.max_iters=2400 trainer.max_epochs=null \
    trainer.eval_every=2400 trainer.checkpoint_every=null 'optimizer.lr=0.01,0.003,0.001' \
    hydra.sweep.dir="$OUT/sweep_sgd"
  SGD_LR=$(best_setting "$OUT/sweep_sgd" optimizer.lr)

  say "1/4 learning-rate x damping sweep, KFC-pre at batch $KFC_BATCH ($KFC_SWEEP_ITERS iterations per job)"
  "$KFCRUN" -m experiment=cifar10_kfc "${COMMON[@]}" "${KFC_SETTINGS[@]}" trainer.max_iters="$KFC_SWEEP_ITERS" \
    trainer.max_epochs=null trainer.eval_every="$KFC_SWEEP_ITERS" trainer.checkpoint_every=null \
    "optimizer.lr=$KFC_LR_GRID" "optimizer.damping=$KFC_DAMPING_GRID" hydra.sweep.dir="$OUT/sweep_kfc"
  KFC_LR=$(best_setting "$OUT/sweep_kfc" optimizer.lr)
  KFC_DAMPING=$(best_setting "$OUT/sweep_kfc" optimizer.damping)
fi
echo "settings: SGD lr $SGD_LR; KFC-pre lr $KFC_LR, damping $KFC_DAMPING"

say "2/4 SGD, batch 128, lr $SGD_LR, $SGD_EPOCHS epochs"
"$KFCRUN" experiment=cifar10_sgd "${COMMON[@]}" optimizer.lr="$SGD_LR" trainer.max_iters=null \
  trainer.max_epochs="$SGD_EPOCHS" trainer.eval_every=780 hydra.run.dir="$OUT/sgd"

say "3/4 KFC-pre, batch $KFC_BATCH, lr $KFC_LR, damping $KFC_DAMPING, $KFC_EPOCHS epochs"
"$KFCRUN" experiment=cifar10_kfc "${COMMON[@]}" "${KFC_SETTINGS[@]}" optimizer.lr="$KFC_LR" optimizer.damping="$KFC_DAMPING" \
  trainer.max_iters=null trainer.max_epochs="$KFC_EPOCHS" trainer.eval_every="$KFC_EVAL_EVERY" hydra.run.dir="$OUT/kfc"

say "4/4 figures and report"
"$PYTHON" "$ROOT/scripts/make_figures.py" "$OUT/sgd" "$OUT/kfc" --kind both --out "$OUT/figures"
"$PYTHON" "$ROOT/scripts/report.py" "$OUT/sgd" "$OUT/kfc" --out "$OUT/report.md"
say "done: $OUT (report.md, figures/)"
