#!/usr/bin/env bash
# Issue 10 study 4: K-FAC with the wide gamma search (gamma_search_decades=4), with and without a
# faster lambda decrease (lambda_decay 0.8), 300 iterations, batch 512, one torch thread per run.
cd /work/study4
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
out=outputs/kfac_study4
common=(experiment=cifar10_kfac dataset.root=/work/shared/data/cifar10 optimizer.init_examples=2048
        trainer.max_iters=300 trainer.max_epochs=null trainer.eval_every=50 trainer.log_every=1
        trainer.checkpoint_every=null trainer.progress=false trainer.train_eval_size=2000 trainer.test_eval_size=2000)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
W="optimizer.gamma_search_decades=4"
L="optimizer.lambda_decay=0.8"
run kfacW_g10 optimizer.damping=10 $W &
run kfacWL_g10 optimizer.damping=10 $W $L &
run kfacWL_g1 optimizer.damping=1 $W $L &
run kfacWL_g1e-3 optimizer.damping=0.001 $W $L &
run kfacWL_g1e-1 optimizer.damping=0.1 $W $L &
wait
