#!/usr/bin/env bash
# Issue 11, second window: K-FAC (experiment=cifar10_resnet18_kfac: alpha, mu, lambda and gamma adapted,
# no lr schedule; initial damping 1) beside a rerun of lanes.sh's SGD run, over the same BUDGET seconds of
# training. SGD's run is deterministic, so its rerun repeats the first window's iterates exactly and its
# clock calibrates this window against the first (KFC-pre ran there). Same evaluation as lanes.sh.
# Usage: bash lanes_kfac.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}; budget=${BUDGET:-2100}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(dataset.root=/work/shared/data/cifar10 trainer.max_epochs=null trainer.max_train_seconds=$budget
        trainer.eval_every=60 trainer.log_every=5 trainer.checkpoint_every=null trainer.progress=false
        trainer.train_eval_size=1000 trainer.test_eval_size=1000)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
run sgd_lr0.03_rerun experiment=cifar10_resnet18_sgd optimizer.lr=0.03 trainer.max_iters=${SGD_ITERS:-480} &
run kfac experiment=cifar10_resnet18_kfac trainer.max_iters=1000 &
wait
