#!/usr/bin/env bash
# Issue 13, step 2: SGD and KFC-pre at the same batch (128) in one run, as the reproduction's long runs
# (averaged parameters, evaluation on 10,000 training and the 10,000 test images every epoch, 390
# iterations). Lane 1: SGD lr 0.003 (the reproduction's sweep) for 40 epochs. Lane 2: KFC-pre at the
# grid's best KFC_LR / KFC_DAMPING (lanes_grid.sh) for 20 epochs at seed 0, then at seed 1 (so that both
# lanes stay busy for about the same time). One torch thread each.
# Usage: KFC_LR=... KFC_DAMPING=... bash lanes_long.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}; lr=${KFC_LR:?KFC_LR}; damping=${KFC_DAMPING:?KFC_DAMPING}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(dataset.root=/work/shared/data/cifar10 trainer.batch_size=128 trainer.max_iters=null trainer.eval_every=390
        trainer.eval_current=false trainer.progress=false trainer.threads=1)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
kfc=(experiment=cifar10_kfc optimizer.init_examples=5120 optimizer.lr=$lr optimizer.damping=$damping trainer.max_epochs=20)
run sgd experiment=cifar10_sgd optimizer.lr=0.003 trainer.max_epochs=40 &
( run kfc128 "${kfc[@]}" seed=0; run kfc128_seed1 "${kfc[@]}" seed=1 ) &
wait
