#!/usr/bin/env bash
# The 300-iteration CPU study of issue 10 (K-FAC from four damping starts, KFC-pre's early-phase
# options at the paper's gamma = 1e-3, and the baselines), one run after the other.
# Batch 512, real CIFAR-10, averaged parameters, optimizer.init_examples=INIT_EXAMPLES (a smaller initial
# estimate than the experiments' 10,000, to save time); every step's statistics go to TensorBoard
# (trainer.log_every=1). Per-iteration results do not depend on the machine's load.
#   scripts/kfac_cpu_study.sh [OUT_DIR] [RUN_NAME ...]      (default: outputs/kfac_study, all runs)
# Environment: PYTHON, KFCRUN_CIFAR10_DIR, INIT_EXAMPLES (default 2048), EVAL_EVERY (default 100),
# EXTRA (more overrides for every run, e.g. "trainer.max_train_seconds=3600 trainer.train_eval_size=2000").
# Several invocations with disjoint RUN_NAMEs may run at once (one output folder per run).
set -euo pipefail
out=${1:-outputs/kfac_study}
shift || true
python=${PYTHON:-python}
data=${KFCRUN_CIFAR10_DIR:-../shared/data/cifar10}
init=${INIT_EXAMPLES:-2048}
# shellcheck disable=SC2206
extra=(${EXTRA:-})
common=(dataset.root="$data" trainer.max_iters=300 trainer.max_epochs=null trainer.eval_every="${EVAL_EVERY:-100}"
        trainer.log_every=1 trainer.checkpoint_every=null trainer.progress=false "${extra[@]}")

declare -A runs=(
  [kfac_g1]="experiment=cifar10_kfac optimizer.damping=1 optimizer.init_examples=$init"
  [kfac_g1e-3]="experiment=cifar10_kfac optimizer.damping=0.001 optimizer.init_examples=$init"
  [kfac_g1e-1]="experiment=cifar10_kfac optimizer.damping=0.1 optimizer.init_examples=$init"
  [kfac_g10]="experiment=cifar10_kfac optimizer.damping=10 optimizer.init_examples=$init"
  [kfc_g1e-3_alg1]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=$init"
  [kfc_g1e-3_warmup]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=$init optimizer.ema_warmup=true"
  [kfc_g1e-3_guard]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=$init optimizer.guard_clip=0.1 optimizer.guard_nu_jump=10"
  [kfc_g1e-3_both]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=$init optimizer.ema_warmup=true optimizer.guard_clip=0.1 optimizer.guard_nu_jump=10"
  [kfc_g1_alg1]="experiment=cifar10_kfc optimizer.init_examples=$init"
  [kfc_g1_both]="experiment=cifar10_kfc optimizer.init_examples=$init optimizer.ema_warmup=true optimizer.guard_clip=0.1 optimizer.guard_nu_jump=10"
  [sgd_bs512]="experiment=cifar10_sgd trainer.batch_size=512 optimizer.lr=0.01"
)
order=(kfac_g1 kfac_g1e-3 kfc_g1e-3_alg1 kfc_g1e-3_both kfac_g1e-1 kfac_g10 kfc_g1_alg1 kfc_g1_both
       kfc_g1e-3_warmup kfc_g1e-3_guard sgd_bs512)
selected=("${@:-${order[@]}}")
for name in "${selected[@]}"; do
  if [[ -f "$out/$name/metrics.jsonl" ]] && grep -q '"iter": 300' "$out/$name/metrics.jsonl"; then
    echo "== $name: done already"; continue
  fi
  echo "== $name: ${runs[$name]}"
  rm -rf "${out:?}/$name"
  mkdir -p "$out"
  # shellcheck disable=SC2086
  $python -m kfcrun ${runs[$name]} "${common[@]}" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1 \
    || echo "== $name: exit $?"
done
