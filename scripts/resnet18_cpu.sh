#!/usr/bin/env bash
# CPU-sized comparison on ResNet-18 (CIFAR stem, BatchNorm) on CIFAR-10 with augmentation
# (issue 11): SGD against KFC-pre (and K-FAC when OPTIMIZERS includes it) at the same batch (128)
# and the same training-time budget. On a 2-core CPU a ResNet-18 step takes seconds, so
# everything is short:
#
#   1. learning-rate sweeps, SWEEP_ITERS iterations per job, best by final training NLL on a
#      fixed EVAL_SIZE-image training subset (training error is still near chance this early);
#      a grid of one value (e.g. KFC_GRID=0.1) skips the sweep and uses that lr;
#   2. one run per optimizer at its best lr for BUDGET_S seconds of training time
#      (trainer.max_train_seconds), evaluated every EVAL_EVERY iterations on EVAL_SIZE training
#      and EVAL_SIZE test images (fixed random subsets); constant lr (a cosine schedule would need the run's length, which a
#      time budget does not fix) and no iterate averaging (the budget is < 1 epoch, and the
#      paper's one-epoch average would mostly be the initial weights); these runs hold the
#      measurement lock (flock /tmp/kfcrun-measure.lock), so no other timed job overlaps;
#   3. the report (time and iterations to given errors) and the figures.
#
# Usage: scripts/resnet18_cpu.sh      Environment: KFCRUN_CIFAR10_DIR, OUT, BUDGET_S, SWEEP_ITERS,
#        EVAL_EVERY, EVAL_SIZE, THREADS, OPTIMIZERS ("sgd kfc" or "sgd kfc kfac"), PYTHON,
#        SGD_GRID, KFC_GRID, KFAC_GRID (comma-separated lrs).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
KFCRUN=("$PYTHON" -m kfcrun)
OUT="${OUT:-$ROOT/outputs/resnet18_cpu/$(date +%Y-%m-%d_%H-%M-%S)}"
BUDGET_S="${BUDGET_S:-1200}"
SWEEP_ITERS="${SWEEP_ITERS:-30}"
EVAL_EVERY="${EVAL_EVERY:-10}"
EVAL_SIZE="${EVAL_SIZE:-2000}"
THREADS="${THREADS:-2}"
OPTIMIZERS="${OPTIMIZERS:-sgd kfc}"
LOCK="${LOCK:-/tmp/kfcrun-measure.lock}"

. "$ROOT/scripts/cifar10_dir.sh" resnet18_cpu
mkdir -p "$OUT"
COMMON=(dataset.root="$DATA" trainer.progress=false trainer.threads="$THREADS" trainer.max_epochs=null
        trainer.train_eval_size="$EVAL_SIZE" trainer.test_eval_size="$EVAL_SIZE" trainer.eval_current=false
        trainer.checkpoint_every=null trainer.lr_schedule=constant optimizer.avg_timescale=null)
# KFC-pre / K-FAC cost settings for a budget of minutes: the initial estimate on 512 images
# (on the clock), statistics every 10 and inverses every 20 iterations (cifar10_kfc's T_s, T_f).
CURVATURE=(optimizer.init_examples=512 optimizer.stats_every=10 optimizer.inverse_every=20)
started=$(date +%s)
say() { printf '\n[resnet18_cpu %4d min] %s\n' $(( ($(date +%s) - started) / 60 )) "$*"; }

best_lr() {  # prints the best job's optimizer.lr (lowest final training NLL)
  "$PYTHON" "$ROOT/scripts/sweep_table.py" "$1" --metric train/nll --json "$1/table.json" >&2
  "$PYTHON" - "$1" <<'PY'
import json, sys
from omegaconf import OmegaConf
best = next(j for j in json.load(open(f"{sys.argv[1]}/table.json"))["jobs"] if j.get("best"))
print(OmegaConf.select(OmegaConf.load(f"{best['path']}/config.yaml"), "optimizer.lr"))
PY
}

declare -A GRID=([sgd]="${SGD_GRID:-0.3,0.1,0.03}" [kfc]="${KFC_GRID:-0.3,0.1,0.03}" [kfac]="${KFAC_GRID:-1.0}")
declare -A EXTRA=([sgd]="" [kfc]="${CURVATURE[*]}" [kfac]="${CURVATURE[*]}")
declare -A BEST
for opt in $OPTIMIZERS; do
  if [[ "${GRID[$opt]}" != *,* ]]; then
    BEST[$opt]="${GRID[$opt]}"
    say "1/3 $opt: one lr given (${GRID[$opt]}), no sweep"
    continue
  fi
  say "1/3 learning-rate sweep, $opt, ${SWEEP_ITERS} iterations per job: lr in {${GRID[$opt]}}"
  # shellcheck disable=SC2086
  "${KFCRUN[@]}" -m experiment=cifar10_resnet18_"$opt" "${COMMON[@]}" ${EXTRA[$opt]} \
    trainer.max_iters="$SWEEP_ITERS" trainer.eval_every="$SWEEP_ITERS" "optimizer.lr=${GRID[$opt]}" \
    hydra.sweep.dir="$OUT/sweep_$opt"
  BEST[$opt]=$(best_lr "$OUT/sweep_$opt")
done

for opt in $OPTIMIZERS; do
  say "2/3 $opt at lr ${BEST[$opt]}, ${BUDGET_S} s of training (waiting for the measurement lock)"
  # shellcheck disable=SC2086
  flock "$LOCK" "${KFCRUN[@]}" experiment=cifar10_resnet18_"$opt" "${COMMON[@]}" ${EXTRA[$opt]} \
    optimizer.lr="${BEST[$opt]}" trainer.max_iters=100000 trainer.max_train_seconds="$BUDGET_S" \
    trainer.eval_every="$EVAL_EVERY" hydra.run.dir="$OUT/$opt"
done

say "3/3 report and figures"
runs=()
for opt in $OPTIMIZERS; do runs+=("$OUT/$opt"); done
"$PYTHON" "$ROOT/scripts/report.py" "${runs[@]}" \
  --train-errors 0.8 0.7 0.6 --test-errors 0.8 0.7 0.6 --out "$OUT/report.md" || true
"$PYTHON" "$ROOT/scripts/make_figures.py" "${runs[@]}" --kind both --out "$OUT/figures" || true
say "done: $OUT"
