#!/usr/bin/env bash
# Issue 13 study (after lane A): cifar10_kfc 300 iterations, batch 512, one torch thread:
# two seeds now (525f1ee) and before issue 13 (bd4eaca), nu subset sizes, training-pass statistics.
while pgrep -f laneA.sh >/dev/null; do sleep 20; done
export PYTHON=/work/main/.venv/bin/python KFCRUN_CIFAR10_DIR=/work/shared/data/cifar10
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=/work/study/outputs/kfac_study3
common=(experiment=cifar10_kfc dataset.root=$KFCRUN_CIFAR10_DIR optimizer.init_examples=2048 trainer.max_iters=300
        trainer.max_epochs=null trainer.eval_every=50 trainer.log_every=1 trainer.checkpoint_every=null
        trainer.progress=false trainer.train_eval_size=2000 trainer.test_eval_size=2000)
run() {  # run NAME TREE OVERRIDES...
  local name=$1 tree=$2; shift 2
  if [[ -f $out/$name/metrics.jsonl ]] && grep -q '"iter": 300' $out/$name/metrics.jsonl; then return; fi
  echo "== $name ($tree): $*"; rm -rf $out/$name
  (cd $tree && PYTHONPATH=$tree $PYTHON -m kfcrun "${common[@]}" "$@" hydra.run.dir=$out/$name > $out/$name.log 2>&1) || echo "== $name: exit $?"
}
run kfc13_seed1 /work/study seed=1
run pre13_seed0 /work/pre13 seed=0
run pre13_seed1 /work/pre13 seed=1
run kfc_nu16 /work/study optimizer.nu_fraction=0.0625
run kfc_sft_full /work/study optimizer.stats_from_training=true optimizer.stats_fraction=1.0
