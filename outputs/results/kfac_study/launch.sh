#!/usr/bin/env bash
# Five streams of scripts/kfac_cpu_study.sh at once (one torch thread each), trimmed to end by ~06:10 UTC.
cd /work/wt-issue10
export PYTHONPATH=$PWD PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INIT_EXAMPLES=512 EVAL_EVERY=50
ev="trainer.train_eval_size=1000 trainer.test_eval_size=1000"
out=outputs/kfac_study2
EXTRA="$ev trainer.max_train_seconds=3600" nohup scripts/kfac_cpu_study.sh $out kfac_g1 > $out/s1.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=3600" nohup scripts/kfac_cpu_study.sh $out kfac_g1e-3 > $out/s2.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=3600" nohup scripts/kfac_cpu_study.sh $out kfac_g10 > $out/s3.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=1700" nohup scripts/kfac_cpu_study.sh $out kfc_g1e-3_alg1 kfc_g1e-3_both > $out/s4.log 2>&1 &
EXTRA="$ev trainer.max_train_seconds=900" nohup scripts/kfac_cpu_study.sh $out sgd_bs512 > $out/s5.log 2>&1 &
wait
