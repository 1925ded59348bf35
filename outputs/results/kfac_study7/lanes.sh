#!/usr/bin/env bash
# Issue 10 study 7: K-FAC from gamma_0 in {1e-3, 1e-1, 1, 10} and 1e-5 (lambda_init unset) with the
# damping ceiling gamma <= 1 x the largest block's mean eigenvalue (optimizer.gamma_ceiling=1), which since
# 2274676 also lowers gamma_0 to the ceiling at the first fit before lambda_0 = gamma_0 is taken;
# 300 iterations, batch 512, kfcrun's other defaults. Two lanes (three runs and two), one torch thread per run.
# Run from a copy of the tree (the code under test): bash lanes.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(experiment=cifar10_kfac dataset.root=/work/shared/data/cifar10 optimizer.init_examples=2048
        trainer.max_iters=300 trainer.max_epochs=null trainer.eval_every=50 trainer.log_every=1
        trainer.checkpoint_every=null trainer.progress=false trainer.train_eval_size=2000 trainer.test_eval_size=2000
        optimizer.gamma_ceiling=1.0)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
(run kfacL_g1 optimizer.damping=1; run kfacL_g1e-3 optimizer.damping=0.001; run kfacL_g1e-5 optimizer.damping=1e-5) &
(run kfacL_g10 optimizer.damping=10; run kfacL_g1e-1 optimizer.damping=0.1) &
wait
