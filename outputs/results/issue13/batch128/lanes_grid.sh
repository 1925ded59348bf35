#!/usr/bin/env bash
# Issue 13: on this CPU a batch-512 step costs about 5.5 batch-128 steps, so KFC-pre at the paper's batch 512
# can be at most ~1.3x faster than SGD at 128 in wall-clock. Does KFC-pre at SGD's batch (128) do better?
# Step 1: a short grid for KFC-pre at batch 128 (1,200 iterations per job = the 153,600 examples of the
# reproduction's 300-iteration batch-512 sweep), picked by final training error (averaged parameters) as in
# scripts/reproduce_cpu.sh. Two lanes with one torch thread each. Usage: bash lanes_grid.sh <tree> <out>
tree=${1:?tree}; out=${2:?output folder}
cd "$tree" || exit 1
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py=/work/main/.venv/bin/python
mkdir -p "$out"
common=(experiment=cifar10_kfc dataset.root=/work/shared/data/cifar10 trainer.batch_size=128
        optimizer.init_examples=5120 trainer.max_iters=1200 trainer.max_epochs=null trainer.eval_every=1200
        trainer.checkpoint_every=null trainer.eval_current=false trainer.progress=false trainer.threads=1)
run() { local name=$1; shift; $py -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1 || echo "== $name: exit $?" >> $out/failures; }
# ROUND=2 ran after round 1 had picked lr 0.01 (damping 1 better than 3): damping below 1 at that lr.
if [[ ${ROUND:-1} == 1 ]]; then
  ( run lr0.03_d1 optimizer.lr=0.03 optimizer.damping=1.0; run lr0.003_d1 optimizer.lr=0.003 optimizer.damping=1.0 ) &
  ( run lr0.01_d1 optimizer.lr=0.01 optimizer.damping=1.0; run lr0.01_d3 optimizer.lr=0.01 optimizer.damping=3.0 ) &
else
  run lr0.01_d0.3 optimizer.lr=0.01 optimizer.damping=0.3 &
  run lr0.01_d0.1 optimizer.lr=0.01 optimizer.damping=0.1 &
fi
wait
