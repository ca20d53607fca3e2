"""Forward time of a LoRA model, unmerged and merged, against the base model (same run, best of N).

    python benchmarks/merged_lora.py [--preset cpu] [--r 8] [--targets c_attn] [--ckpt runs/pipeline/base]

Unmerged, every adapted layer computes W x + s B (A x): two extra thin matmuls per layer. Merged,
W' = W + s B A is folded into the weight once (`minillm.peft.apply.merge_peft`) and the model *is* a plain
GPT again, so the budget is t(merged) / t(base) <= 1.05. The three models take turns call by call
(`minillm.stages.compare.forward_seconds`: on a CPU the process's CPU time, which other programs on a shared
machine barely disturb; on a GPU synchronised wall time), and the best of many calls counts.
"""
from __future__ import annotations

import argparse
import copy

import torch

from minillm.config import get_preset
from minillm.model import GPT
from minillm.peft.apply import apply_peft, merge_peft
from minillm.stages.compare import forward_seconds

BUDGET = 1.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", help="model shape when no --ckpt is given (default: cpu)")
    ap.add_argument("--ckpt", default=None, help="a trained base run directory (default: random weights)")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--targets", default="c_attn", help="comma-separated target modules (default: c_attn)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: the context length)")
    ap.add_argument("--repeats", type=int, default=10, help="at least this many timed calls per model")
    ap.add_argument("--seconds", type=float, default=10.0, help="time budget for the timed rounds")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.ckpt:
        from minillm.runs import load_run

        base, _, _ = load_run(args.ckpt)
    else:
        cfg = get_preset(args.preset).model
        cfg.vocab_size = get_preset(args.preset).vocab_size
        base = GPT(cfg).eval()
    cfg = base.config
    lora = apply_peft(copy.deepcopy(base), "lora", target_modules=args.targets.split(","), r=args.r)
    with torch.no_grad():  # a trained-looking update (B = 0 at init would make merging a no-op)
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.02)
    merged = merge_peft(copy.deepcopy(lora)).eval()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq or cfg.block_size))
    with torch.no_grad():
        gap = (lora(idx) - merged(idx)).abs().max().item()
        moved = (lora(idx) - base(idx)).abs().max().item()
    t = forward_seconds({"base": base, "unmerged": lora, "merged": merged}, idx, args.repeats, args.seconds)
    clock = "CPU time" if idx.device.type == "cpu" else "wall time"
    print(f"model: {cfg.n_layer} layers, n_embd {cfg.n_embd}; input {tuple(idx.shape)}; LoRA r={args.r} on "
          f"{args.targets}; threads {torch.get_num_threads()}; best {clock} per forward")
    print(f"max |logits unmerged - merged| = {gap:.2e}  (the adapter moves the logits by up to {moved:.2e})")
    for name in ("base", "unmerged", "merged"):
        print(f"{name:9s} {t[name] * 1e3:8.2f} ms   ratio to base {t[name] / t['base']:.3f}")
    ratio = t["merged"] / t["base"]
    print(f"merged / base = {ratio:.3f}  (budget <= {BUDGET}: {'ok' if ratio <= BUDGET else 'over'})")


if __name__ == "__main__":
    main()
