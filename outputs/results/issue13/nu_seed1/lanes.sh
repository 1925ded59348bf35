#!/usr/bin/env bash
# Issue 13: does nu on 1/16 of the batch (cifar10_kfc's default) cost per-iteration progress against the
# paper's 1/4? The reproduction's KFC-pre run (lr 0.03, damping 1, init_examples 5120, batch 512, constant lr,
# evaluation every 97 iterations) at seed 1, nu_fraction 0.25 and 0.0625, on the same code, side by side with
# one torch thread each, for EPOCHS epochs (default 10: the first half of the reproduction's 20, which holds
# its 20%-training-error and 25%-test-error crossings; seed 0 of each is in ../../cifar10_cpu{,_nu16}).
# Only the averaged parameters are evaluated (the thresholds use them). SEED (default 1) picks the seed.
# Usage: [SEED=2] bash lanes.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(experiment=cifar10_kfc dataset.root=/work/shared/data/cifar10 seed=${SEED:-1} optimizer.init_examples=5120
        optimizer.lr=0.03 optimizer.damping=1.0 trainer.max_iters=null trainer.max_epochs=${EPOCHS:-10} trainer.eval_every=97
        trainer.eval_current=false trainer.progress=false trainer.threads=1)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
run nu4_seed${SEED:-1} optimizer.nu_fraction=0.25 &
run nu16_seed${SEED:-1} optimizer.nu_fraction=0.0625 &
wait
