#!/usr/bin/env bash
# The 300-iteration CPU study of issue 10 (K-FAC from four damping starts, KFC-pre's early-phase
# options at the paper's gamma = 1e-3, and the baselines), one run after the other.
# Batch 512, real CIFAR-10, averaged parameters, optimizer.init_examples=2048 (a smaller initial
# estimate than the experiments' 10,000, to save time); every step's statistics go to TensorBoard
# (trainer.log_every=1). Per-iteration results do not depend on the machine's load.
#   scripts/kfac_cpu_study.sh [OUT_DIR] [RUN_NAME ...]      (default: outputs/kfac_study, all runs)
set -euo pipefail
out=${1:-outputs/kfac_study}
shift || true
python=${PYTHON:-python}
data=${KFCRUN_CIFAR10_DIR:-../shared/data/cifar10}
common=(dataset.root="$data" trainer.max_iters=300 trainer.max_epochs=null trainer.eval_every=100
        trainer.log_every=1 trainer.checkpoint_every=null trainer.progress=false)

declare -A runs=(
  [kfac_g1]="experiment=cifar10_kfac optimizer.damping=1 optimizer.init_examples=2048"
  [kfac_g1e-3]="experiment=cifar10_kfac optimizer.damping=0.001 optimizer.init_examples=2048"
  [kfac_g1e-1]="experiment=cifar10_kfac optimizer.damping=0.1 optimizer.init_examples=2048"
  [kfac_g10]="experiment=cifar10_kfac optimizer.damping=10 optimizer.init_examples=2048"
  [kfc_g1e-3_alg1]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=2048"
  [kfc_g1e-3_warmup]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=2048 optimizer.ema_warmup=true"
  [kfc_g1e-3_guard]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=2048 optimizer.guard_clip=0.1 optimizer.guard_nu_jump=10"
  [kfc_g1e-3_both]="experiment=cifar10_kfc optimizer.damping=0.001 optimizer.init_examples=2048 optimizer.ema_warmup=true optimizer.guard_clip=0.1 optimizer.guard_nu_jump=10"
  [kfc_g1_alg1]="experiment=cifar10_kfc optimizer.init_examples=2048"
  [kfc_g1_both]="experiment=cifar10_kfc optimizer.init_examples=2048 optimizer.ema_warmup=true optimizer.guard_clip=0.1 optimizer.guard_nu_jump=10"
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
  # shellcheck disable=SC2086
  $python -m kfcrun ${runs[$name]} "${common[@]}" hydra.run.dir="$out/$name"
done
