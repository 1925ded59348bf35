#!/usr/bin/env bash
# Issue 10 study, lane B (K-FAC from four damping starts; 300 iterations each, one torch thread).
cd /work/study
export PYTHONPATH=$PWD PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INIT_EXAMPLES=2048 EVAL_EVERY=50
out=outputs/kfac_study3
EXTRA="trainer.train_eval_size=2000 trainer.test_eval_size=2000" scripts/kfac_cpu_study.sh $out kfac_g1e-3 kfac_g1 kfac_g10 kfac_g1e-1
