#!/usr/bin/env bash
# Data-parallel runs reach the same errors in the same iterations as one process (issue 12's
# measurement, CPU-sized): SGD and KFC-pre at global batch 4096 (paper Fig. 5, Sec. 5.3) for
# ITERS updates, once in one process and once on RANKS gloo processes under torchrun, with
# the same seed. The global-index sampling makes the two compute the same thing up to the
# summation order; this script shows how far that carries in float32 over a real run.
#
#   1. for each optimizer: `kfcrun experiment=cifar10_bs4096_<opt>` in one process
#      (THREADS torch threads), then under `torchrun --nproc_per_node=RANKS` (THREADS/RANKS
#      threads each, so both use the same cores);
#   2. the table (scripts/budget_table.py): training NLL and errors at every evaluated
#      iteration and the logged mini-batch losses (every trainer.log_every steps; not every step:
#      the divergence guard counts log intervals, and 3 one-step intervals above 3x the first
#      loss stopped a KFC-pre run that spikes early), 1 process beside RANKS.
#
# Usage: scripts/ranks_cpu.sh      Environment: KFCRUN_CIFAR10_DIR, OUT, ITERS (default 40),
#        EVAL_EVERY (5), EVAL_SIZE (2000), RANKS (2), THREADS (2), OPTIMIZERS ("sgd kfc"), PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${OUT:-$ROOT/outputs/ranks_cpu/$(date +%Y-%m-%d_%H-%M-%S)}"
ITERS="${ITERS:-40}"
EVAL_EVERY="${EVAL_EVERY:-5}"
EVAL_SIZE="${EVAL_SIZE:-2000}"
RANKS="${RANKS:-2}"
THREADS="${THREADS:-2}"
OPTIMIZERS="${OPTIMIZERS:-sgd kfc}"

. "$ROOT/scripts/cifar10_dir.sh" ranks_cpu
PER_RANK=$(( THREADS / RANKS > 0 ? THREADS / RANKS : 1 ))
mkdir -p "$OUT"
COMMON=(dataset.root="$DATA" trainer.progress=false trainer.max_iters="$ITERS" trainer.max_epochs=null
        trainer.eval_every="$EVAL_EVERY" trainer.checkpoint_every=null
        trainer.train_eval_size="$EVAL_SIZE" trainer.test_eval_size="$EVAL_SIZE")

for opt in $OPTIMIZERS; do
  echo "[ranks_cpu] $opt, batch 4096, 1 process, $THREADS threads"
  "$PYTHON" -m kfcrun experiment="cifar10_bs4096_$opt" "${COMMON[@]}" trainer.threads="$THREADS" \
    hydra.run.dir="$OUT/${opt}_1"
  echo "[ranks_cpu] $opt, batch 4096, $RANKS processes, $PER_RANK thread(s) each"
  OMP_NUM_THREADS="$PER_RANK" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$RANKS" \
    -m kfcrun experiment="cifar10_bs4096_$opt" "${COMMON[@]}" trainer.threads="$PER_RANK" \
    hydra.run.dir="$OUT/${opt}_$RANKS"
  "$PYTHON" "$ROOT/scripts/budget_table.py" "$OUT/${opt}_1" "$OUT/${opt}_$RANKS" --every 120 \
    --batch-loss --out "$OUT/table_$opt.md"
done
echo "[ranks_cpu] done: $OUT (table_*.md)"
