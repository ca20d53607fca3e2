"""NF4 benchmark: speed of quantise + dequantise, storage, and error of NF4 vs FP4 vs int4.

    python benchmarks/nf4.py [--size 4096] [--repeats 7]

Times `quantize_4bit` + `dequantize_4bit` (NF4, blocksize 64, double quantisation; the fast path of
minillm/quant/nf4.py) on a size x size fp32 matrix, best of N. When bitsandbytes is installed, its
`quantize_4bit(compress_statistics=True)` and `dequantize_4bit` are timed in the same run, interleaved with
ours, and the ratio is printed. Then times the readable path (`quantize_4bit_reference` +
`dequantize_4bit_reference`, the same bits) for comparison, and prints the mean squared / max error of each
4-bit data type on Gaussian weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from minillm.quant.nf4 import (
    dequantize_4bit,
    dequantize_4bit_reference,
    quantization_error,
    quantize_4bit,
    quantize_4bit_reference,
)


def best_ms(fn: Callable[[], object], timings: list[float]) -> None:
    """Run fn once and append its wall time in ms."""
    start = time.perf_counter()
    fn()
    timings.append((time.perf_counter() - start) * 1e3)


def load_bitsandbytes():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # absent, or installed without a usable backend
        return None
    return bnbf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    w = torch.randn(args.size, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, W: {tuple(w.shape)} fp32")

    bnbf = load_bitsandbytes()
    ours: dict[str, list[float]] = {"quantize": [], "dequantize": []}
    theirs: dict[str, list[float]] = {"quantize": [], "dequantize": []}
    q = quantize_4bit(w)
    dequantize_4bit(q)  # warm-up
    if bnbf is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bnbf.dequantize_4bit(packed, state)
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        best_ms(lambda: quantize_4bit(w), ours["quantize"])
        best_ms(lambda: dequantize_4bit(q), ours["dequantize"])
        if bnbf is not None:
            best_ms(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                    theirs["quantize"])
            best_ms(lambda: bnbf.dequantize_4bit(packed, state), theirs["dequantize"])

    mine = {k: min(v) for k, v in ours.items()}
    total = mine["quantize"] + mine["dequantize"]
    print(f"minillm NF4+DQ: quantize {mine['quantize']:.1f} ms, dequantize {mine['dequantize']:.1f} ms, "
          f"total {total:.1f} ms (best of {args.repeats})")
    if bnbf is not None:
        import bitsandbytes

        ref = {k: min(v) for k, v in theirs.items()}
        ref_total = ref["quantize"] + ref["dequantize"]
        print(f"bitsandbytes {bitsandbytes.__version__} NF4+DQ: quantize {ref['quantize']:.1f} ms, "
              f"dequantize {ref['dequantize']:.1f} ms, total {ref_total:.1f} ms")
        print(f"ratio minillm / bitsandbytes: quantize {mine['quantize'] / ref['quantize']:.2f}, "
              f"dequantize {mine['dequantize'] / ref['dequantize']:.2f}, total {total / ref_total:.2f}")
    else:
        print("bitsandbytes not installed: no reference timing")
    readable: dict[str, list[float]] = {"quantize": [], "dequantize": []}
    for _ in range(min(3, args.repeats)):  # after the comparison above, so it cannot disturb it
        best_ms(lambda: quantize_4bit_reference(w), readable["quantize"])
        best_ms(lambda: dequantize_4bit_reference(q), readable["dequantize"])
    slow = {k: min(v) for k, v in readable.items()}
    print(f"readable path (*_reference, same bits): quantize {slow['quantize']:.1f} ms, "
          f"dequantize {slow['dequantize']:.1f} ms; fast path speed-up {sum(slow.values()) / total:.1f}x")
    print(f"storage: {q.nbytes} bytes = {q.bits_per_param:.4f} bits/param with double quantisation, "
          f"{quantize_4bit(w, double_quant=False).bits_per_param:.4f} without")

    print("\nerror on N(0, 1) weights, blocksize 64 (no double quantisation):")
    print("| type | MSE | max abs error |\n|---|---|---|")
    for quant_type in ("nf4", "fp4", "int4"):
        err = quantization_error(w, quant_type)
        print(f"| {quant_type} | {err['mse']:.6f} | {err['max_abs']:.4f} |")
    err = quantization_error(w, "nf4", double_quant=True)
    print(f"| nf4 + DQ | {err['mse']:.6f} | {err['max_abs']:.4f} |")


if __name__ == "__main__":
    main()
