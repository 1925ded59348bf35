#!/usr/bin/env bash
# Second wave (05:09 UTC): KFC-pre at gamma = 1e-3 without the divergence guard (issue 9's guard stopped
# both at iteration 7: the fragile early phase is what is measured), the KFC-pre reference at gamma = 1,
# and SGD again with a longer budget.
cd /work/wt-issue10
export PYTHONPATH=$PWD PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INIT_EXAMPLES=512 EVAL_EVERY=50
ev="trainer.train_eval_size=1000 trainer.test_eval_size=1000"
out=outputs/kfac_study2
EXTRA="$ev trainer.max_train_seconds=3000 divergence.max_loss_ratio=null" nohup scripts/kfac_cpu_study.sh $out kfc_g1e-3_alg1 > $out/s4a.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=3000 divergence.max_loss_ratio=null" nohup scripts/kfac_cpu_study.sh $out kfc_g1e-3_both > $out/s4b.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=3000" nohup scripts/kfac_cpu_study.sh $out kfc_g1_alg1 > $out/s6.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=3000" nohup scripts/kfac_cpu_study.sh $out sgd_bs512 > $out/s5b.log 2>&1 &
wait
