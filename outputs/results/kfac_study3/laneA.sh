#!/usr/bin/env bash
# Issue 10 study, lane A (KFC-pre and SGD; 300 iterations each, one torch thread), quiet machine 2026-12-01.
cd /work/study
export PYTHONPATH=$PWD PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INIT_EXAMPLES=2048 EVAL_EVERY=50
ev="trainer.train_eval_size=2000 trainer.test_eval_size=2000"
out=outputs/kfac_study3
EXTRA="$ev" scripts/kfac_cpu_study.sh $out kfc_g1_alg1 sgd_bs512
EXTRA="$ev divergence.max_loss_ratio=null" scripts/kfac_cpu_study.sh $out kfc_g1e-3_alg1 kfc_g1e-3_both kfc_g1e-3_warmup kfc_g1e-3_guard
