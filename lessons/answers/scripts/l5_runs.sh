#!/bin/bash
set -x
M=/work/main/.venv/bin/python
S=/tmp/seeds_after/seed_0
cd /work/main
$M -m minillm ppo --init $S/sft --reward $S/rm --out /tmp/ans/l5_lam1 --target-kl 0.5 --kl-horizon 100 --lam 1 > /tmp/ans/l5_lam1.log 2>&1
$M -m minillm grpo --init $S/sft --reward $S/rm --out /tmp/ans/l5_grpo_t15 --temperature 1.5 > /tmp/ans/l5_grpo_t15.log 2>&1
OV="--temperature 1.5 --normalize-scores --critic separate --lr 1e-4 --min-lr 1e-4 --max-steps 100 --kl-coef 0"
$M -m minillm ppo --init $S/sft --reward $S/rm --out /tmp/ans/l5_over_rm $OV > /tmp/ans/l5_over_rm.log 2>&1
cd /tmp/ans/copy5 && $M -m minillm ppo --init $S/sft --reward $S/rm --out /tmp/ans/l5_over_gold $OV > /tmp/ans/l5_over_gold.log 2>&1
cd /work/main && $M /tmp/ans/scripts/l5_heldout.py $S/sft /tmp/ans/l5_grpo_t15 /tmp/ans/l5_over_rm /tmp/ans/l5_over_gold > /tmp/ans/l5_heldout.txt 2>&1
echo done
