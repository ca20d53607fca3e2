"""Tokens/s of one full training step (batch fetch, forward, backward, clip, AdamW step).

Shape: nanoGPT's "baby GPT on CPU" (n_layer 4, n_head 4, n_embd 128, block 64, batch 12, fp32, no bias,
vocab 65 as in shakespeare_char). nanoGPT itself runs about 17.8k tokens/s (43 ms/iter) for this shape on
the 2-core reference machine.

    python benchmarks/train_throughput.py [--iters 60] [--attn-impl sdpa|explicit]
"""
from __future__ import annotations

import argparse
import time

import torch

from minillm.config import TrainConfig
from minillm.datasets import random_windows
from minillm.model import GPT, GPTConfig
from minillm.stages.pretrain import lm_loss
from minillm.train import configure_optimizer

NANOGPT_TOKENS_PER_S = 17_800  # measured for nanoGPT on the reference machine (see module docstring)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--attn-impl", default="sdpa")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
                    attn_impl=args.attn_impl)
    tcfg = TrainConfig(batch_size=12, lr=1e-3, grad_clip=1.0, weight_decay=0.1)
    model = GPT(cfg).train()
    opt = configure_optimizer(model, tcfg)
    data = torch.randint(0, 65, (1_000_000,))
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        batch = random_windows(data, tcfg.batch_size, cfg.block_size, gen)
        loss_sum, n = lm_loss(model, batch)
        loss_sum.backward()
        torch._foreach_mul_([p.grad for p in params], 1.0 / n)  # as minillm.train does
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    seconds = time.perf_counter() - t0
    tokens = args.iters * tcfg.batch_size * cfg.block_size
    tok_s = tokens / seconds
    print(f"threads={torch.get_num_threads()} params={model.num_parameters():,}")
    print(f"{1000 * seconds / args.iters:.1f} ms/iter, {tok_s:,.0f} tokens/s "
          f"({tok_s / NANOGPT_TOKENS_PER_S:.2f}x nanoGPT's {NANOGPT_TOKENS_PER_S:,} tokens/s)")


if __name__ == "__main__":
    main()
