#!/usr/bin/env bash
# Issue 11: ResNet-18 (CIFAR stem, BN) on CIFAR-10 with augmentation, batch 128, SGD vs KFC-pre at lr 0.1
# (the experiments' lr), 150 iterations each, one torch thread each, run side by side. The per-second
# comparison combines these per-iteration curves with bench_step's CPU-time step ratio.
cd /work/study2
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
data=/work/shared/data/cifar10; out=/work/study2/outputs/resnet18_iters
common=(dataset.root=$data trainer.progress=false trainer.threads=1 trainer.max_epochs=null trainer.max_iters=150
        trainer.eval_every=25 trainer.train_eval_size=2000 trainer.test_eval_size=2000 trainer.eval_current=false
        trainer.checkpoint_every=null trainer.lr_schedule=constant optimizer.avg_timescale=null trainer.log_every=1)
mkdir -p $out
/work/main/.venv/bin/python -m kfcrun experiment=cifar10_resnet18_sgd "${common[@]}" optimizer.lr=0.1 hydra.run.dir=$out/sgd > $out/sgd.log 2>&1 &
/work/main/.venv/bin/python -m kfcrun experiment=cifar10_resnet18_kfc "${common[@]}" optimizer.lr=0.1 \
  optimizer.init_examples=512 hydra.run.dir=$out/kfc > $out/kfc.log 2>&1 &
wait
