#!/bin/bash
# Lesson 4 exercises 3 and 4: reward runs at the cpu preset, seed 0, 64 normalisation prompts.
set -x
M=/work/main/.venv/bin/python
common="--seed 0 --norm-prompts 64"
cd /tmp/ans/copy && $M -m minillm reward --init /tmp/seeds_after/seed_0/sft --no-loglik --out /tmp/ans/l4_meanpool $common > /tmp/ans/l4_meanpool.log 2>&1
cd /work/main
$M -m minillm reward --init /tmp/seeds_after/seed_0/sft --no-loglik --out /tmp/ans/l4_sft_nolog $common > /tmp/ans/l4_sft_nolog.log 2>&1
$M -m minillm reward --init /tmp/seeds_after/seed_0/base --loglik --out /tmp/ans/l4_base_log $common > /tmp/ans/l4_base_log.log 2>&1
$M -m minillm reward --init /tmp/seeds_after/seed_0/base --no-loglik --out /tmp/ans/l4_base_nolog $common > /tmp/ans/l4_base_nolog.log 2>&1
$M -m minillm pretrain --max-steps 1 --lr 1e-12 --min-lr 0 --warmup-steps 0 --eval-interval 0 --seed 0 --out /tmp/ans/l4_fresh > /tmp/ans/l4_fresh.log 2>&1
$M -m minillm reward --init /tmp/ans/l4_fresh --loglik --out /tmp/ans/l4_fresh_log $common > /tmp/ans/l4_fresh_log.log 2>&1
$M -m minillm reward --init /tmp/ans/l4_fresh --no-loglik --out /tmp/ans/l4_fresh_nolog $common > /tmp/ans/l4_fresh_nolog.log 2>&1
echo done
