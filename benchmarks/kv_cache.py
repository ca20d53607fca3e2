"""Generation speed with the KV cache vs without: 256 new tokens, greedy, at a preset's model shape.

    python benchmarks/kv_cache.py [--preset cpu] [--new-tokens 256] [--ckpt runs/pipeline/base]

Without a cache every step re-runs the whole sequence; with it, each step runs one token against the
cached keys/values. Both runs are timed in the same process (this machine is noisy: compare the ratio).
"""
from __future__ import annotations

import argparse
import time

import torch

from minillm.config import get_preset
from minillm.model import GPT
from minillm.sampling import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--ckpt", default=None, help="a trained run directory (default: random weights)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.ckpt:
        from minillm.runs import load_run

        model, _, _ = load_run(args.ckpt)
    else:
        cfg = get_preset(args.preset).model
        cfg.vocab_size = get_preset(args.preset).vocab_size
        need = args.prompt_tokens + args.new_tokens
        if need > cfg.block_size:
            # Past the context the window slides and both paths must recompute it, so the comparison is
            # made at the preset's width and depth with a context long enough for the whole sequence.
            print(f"note: block_size raised from {cfg.block_size} to {need} so {args.new_tokens} new tokens fit")
            cfg.block_size = need
        model = GPT(cfg).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))
    times: dict[bool, float] = {}
    outs: dict[bool, torch.Tensor] = {}
    generate(model, prompt, 8, temperature=0)  # warm-up
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs[use_cache] = generate(model, prompt, args.new_tokens, temperature=0, use_cache=use_cache)
            best = min(best, time.perf_counter() - t0)
        times[use_cache] = best
    same = torch.equal(outs[True], outs[False])
    print(f"model: {cfg.n_layer} layers, n_embd {cfg.n_embd}, block {cfg.block_size}; "
          f"{args.new_tokens} new tokens, greedy; best of {args.repeats}")
    print(f"with cache:    {times[True]:.3f} s  ({args.new_tokens / times[True]:,.0f} tokens/s)")
    print(f"without cache: {times[False]:.3f} s  ({args.new_tokens / times[False]:,.0f} tokens/s)")
    print(f"speed-up: {times[False] / times[True]:.1f}x   identical tokens: {same}")


if __name__ == "__main__":
    main()
