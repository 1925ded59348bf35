#!/usr/bin/env bash
# Issue 13, step 3: at batch 128 the inverses and statistics cost per iteration what they cost at 512 (their
# periods T_s = 10, T_f = 20 count iterations), so a KFC-pre step there costs 1.27 SGD steps (lanes_long.sh).
# Does scaling the periods with the examples (T_s = 40, T_f = 80: the batch-512 periods in examples) keep the
# per-iteration progress? KFC-pre at batch 128 (lr 0.01, damping 1, seed 0) for EPOCHS epochs (default 12,
# past the 20%-training and 21%-test-error crossings of lanes_long.sh), both periods side by side in one run
# with one torch thread each. Usage: bash lanes_periods.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(experiment=cifar10_kfc_batch128 dataset.root=/work/shared/data/cifar10 optimizer.init_examples=5120 seed=0
        trainer.max_iters=null trainer.max_epochs=${EPOCHS:-12} trainer.eval_every=390 trainer.eval_current=false
        trainer.progress=false trainer.threads=1)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
run periods_10_20 optimizer.stats_every=10 optimizer.inverse_every=20 &
run periods_40_80 optimizer.stats_every=40 optimizer.inverse_every=80 &
wait
