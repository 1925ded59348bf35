#!/usr/bin/env bash
# Issue 10 study: K-FAC from gamma_0 = 0.1 (the fourth start), started beside the gamma_0 = 10 run.
cd /work/study
export PYTHONPATH=$PWD PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INIT_EXAMPLES=2048 EVAL_EVERY=50
EXTRA="trainer.train_eval_size=2000 trainer.test_eval_size=2000" scripts/kfac_cpu_study.sh outputs/kfac_study3 kfac_g1e-1
