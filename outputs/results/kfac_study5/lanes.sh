#!/usr/bin/env bash
# Issue 10 study 5: K-FAC from gamma_0 in {1e-3, 1e-1, 1, 10} with one lambda_0 = 1e-3 for all and
# the gamma search also at iteration 1 (gamma_search_at_start), 300 iterations, batch 512, kfcrun's
# other constants (as study 4). Two lanes of two runs, one torch thread per run.
# Run from a copy of the tree (the code under test): bash lanes.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(experiment=cifar10_kfac dataset.root=/work/shared/data/cifar10 optimizer.init_examples=2048
        trainer.max_iters=300 trainer.max_epochs=null trainer.eval_every=50 trainer.log_every=1
        trainer.checkpoint_every=null trainer.progress=false trainer.train_eval_size=2000 trainer.test_eval_size=2000
        optimizer.lambda_init=0.001 optimizer.gamma_search_at_start=true)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
(run kfacS_g1 optimizer.damping=1; run kfacS_g1e-3 optimizer.damping=0.001) &
(run kfacS_g10 optimizer.damping=10; run kfacS_g1e-1 optimizer.damping=0.1) &
wait
