#!/usr/bin/env bash
# Third wave (05:15 UTC): KFC-pre at the experiment's gamma = 1 with the warm-up and the guard (the default question).
cd /work/wt-issue10
export PYTHONPATH=$PWD PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INIT_EXAMPLES=512 EVAL_EVERY=50
ev="trainer.train_eval_size=1000 trainer.test_eval_size=1000"
out=outputs/kfac_study2
EXTRA="$ev trainer.max_train_seconds=2700" nohup scripts/kfac_cpu_study.sh $out kfc_g1_both > $out/s7.log 2>&1 &
wait
