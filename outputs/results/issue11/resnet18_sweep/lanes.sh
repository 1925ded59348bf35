#!/usr/bin/env bash
# Issue 11: a small lr (x damping) grid for SGD and KFC-pre on ResNet-18 (CIFAR stem, BatchNorm), CIFAR-10,
# batch 128 with augmentation, cosine lr decay to 0 over ITERS iterations, the same budget for every run.
# Two lanes, one torch thread per run. Evaluation (current and averaged parameters) on 2,000 training and
# 2,000 test images at ITERS/2 and ITERS. Run from a copy of the tree: bash sweep_lanes.sh <tree> <out> [lane]
# (lane 1 or 2 runs that lane alone, in the foreground; none runs both in the background and waits).
tree=${1:?tree}; out=${2:?output folder}; lane=${3:-both}; iters=${ITERS:-60}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(dataset.root=/work/shared/data/cifar10 trainer.max_iters=$iters trainer.max_epochs=null
        trainer.eval_every=$((iters / 2)) trainer.log_every=5 trainer.checkpoint_every=null trainer.progress=false
        trainer.train_eval_size=2000 trainer.test_eval_size=2000)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
sgd() { run sgd_lr$1 experiment=cifar10_resnet18_sgd optimizer.lr=$1; }
kfc() { run kfc_lr$1_g$2 experiment=cifar10_resnet18_kfc optimizer.lr=$1 optimizer.damping=$2; }
lane1() { kfc 0.1 1; kfc 0.03 0.1; sgd 0.1; sgd 0.3; }
lane2() { kfc 0.1 0.1; kfc 0.03 1; sgd 0.03; }
case $lane in
  1) lane1 ;;
  2) lane2 ;;
  *) lane1 & lane2 & wait ;;
esac
