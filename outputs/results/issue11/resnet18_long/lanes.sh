#!/usr/bin/env bash
# Issue 11: ResNet-18 (CIFAR stem, BatchNorm) on CIFAR-10, SGD against KFC-pre at the grid's best settings
# (../resnet18_sweep: lr 0.03 for both, damping 1 for KFC-pre) over the same training-time budget.
# Batch 128, augmentation on, cosine lr decay to 0 over each method's own iteration horizon, chosen so that
# both use about BUDGET seconds of training (SGD ~4.3 s/it, KFC-pre ~6.3 s/it after its first 60 its on
# this CPU at one thread); trainer.max_train_seconds = BUDGET caps either run. Evaluation of current and
# averaged parameters every 60 iterations on 1,000 training and 1,000 test images (not on the clock).
# Two lanes side by side, one torch thread each. Usage: bash lanes.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}; budget=${BUDGET:-2100}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(dataset.root=/work/shared/data/cifar10 trainer.max_epochs=null trainer.max_train_seconds=$budget
        trainer.eval_every=60 trainer.log_every=5 trainer.checkpoint_every=null trainer.progress=false
        trainer.train_eval_size=1000 trainer.test_eval_size=1000 optimizer.lr=0.03)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
run sgd_lr0.03 experiment=cifar10_resnet18_sgd trainer.max_iters=${SGD_ITERS:-480} &
run kfc_lr0.03_g1 experiment=cifar10_resnet18_kfc optimizer.damping=1 trainer.max_iters=${KFC_ITERS:-300} &
wait
