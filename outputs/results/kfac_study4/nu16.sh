#!/usr/bin/env bash
# Issue 13: cifar10_kfc with nu on 1/16 of the batch, seed 1 (seed 0 and both seeds at 1/4 in kfac_study3).
cd /work/study4
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=outputs/kfac_study4
/work/main/.venv/bin/python -m kfcrun experiment=cifar10_kfc dataset.root=/work/shared/data/cifar10 optimizer.init_examples=2048 \
  trainer.max_iters=300 trainer.max_epochs=null trainer.eval_every=50 trainer.log_every=1 trainer.checkpoint_every=null \
  trainer.progress=false trainer.train_eval_size=2000 trainer.test_eval_size=2000 \
  seed=1 optimizer.nu_fraction=0.0625 hydra.run.dir=$out/kfc_nu16_seed1 > $out/kfc_nu16_seed1.log 2>&1
