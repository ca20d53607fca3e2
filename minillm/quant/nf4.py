"""Blockwise 4-bit quantisation: NormalFloat4 (NF4), FP4 and double quantisation.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores a frozen weight
matrix W as 4-bit indices into a 16-value code table, one absmax scale per block of 64 weights:

    absmax_b = max_{i in b} |w_i|                 (one fp32 scale per block b)
    q_i      = argmin_j |w_i / absmax_b - code_j|  (nearest code; an exact tie goes to the lower code)
    w_i     ~= code[q_i] * absmax_b                (dequantisation)

NF4's 16 codes are quantiles of N(0, 1), normalised to [-1, 1], so each code is used about equally
often by normally distributed weights. "Double quantisation" then quantises the fp32 absmax values
themselves: c = mean(absmax), and (absmax - c) is quantised blockwise (blocks of 256) to 8 bits with
the signed dynamic map, whose own scales stay fp32:

    absmax_b ~= dyn[absmax_q_b] * absmax_scale_{b // 256} + c

Storage per parameter (blocksize 64): 4 + 32/64 = 4.5 bits, or 4 + 8/64 + 32/(64*256) ~= 4.127 bits
with double quantisation. The semantics (code tables, nibble order, tie rule, partial blocks) follow
bitsandbytes' `quantize_4bit`/`dequantize_4bit` so that our bytes equal theirs.

Read top to bottom:
  1. the code tables (NF4, FP4, int4, the 8-bit dynamic map);
  2. the readable path, one short function per equation: `quantize_blockwise_reference`,
     `dequantize_blockwise_reference`, `pack_4bit`, `double_quantize_reference`, `quantize_4bit_reference`,
     `dequantize_4bit_reference`;
  3. the fast path, the same numbers computed with lookup tables in cache-sized chunks:
     `quantize_blockwise_fast`, `dequantize_blockwise_fast`, `quantize_4bit_fast`, `dequantize_4bit_fast`;
     tests/test_nf4.py checks that it is bit-identical to the readable path;
  4. the public API (`quantize_4bit`, `dequantize_4bit`, `quantize_blockwise`, ...), which is the fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "QUANT_TYPES",
    "QuantState4bit",
    "derive_nf4_code",
    "create_dynamic_map",
    "get_4bit_code",
    "nearest_code_reference",
    "quantize_blockwise_reference",
    "dequantize_blockwise_reference",
    "pack_4bit",
    "unpack_4bit",
    "double_quantize_reference",
    "quantize_4bit_reference",
    "dequantize_absmax_reference",
    "dequantize_4bit_reference",
    "nearest_code_fast",
    "quantize_blockwise_fast",
    "dequantize_blockwise_fast",
    "quantize_4bit_fast",
    "dequantize_absmax_fast",
    "dequantize_4bit_fast",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "dequantize_4bit",
    "dequantize_absmax",
    "quantization_error",
]

# ====================================================================================================
# 1. code tables

# NF4 (QLoRA appendix / bitsandbytes `get_4bit_type("nf4")`): 7 negative values, an exact zero, 8 positive.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 = E2M1 float in bitsandbytes' index order: index bit 3 is the sign, the magnitudes
# (0, 1/16, 8, 12, 4, 6, 2, 3) of indices 0..7 are divided by 12 so that the largest is 1.
# Index 8 is -0 (sign bit set on zero).
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=torch.float32) / 12.0
FP4_CODE = torch.cat([FP4_CODE, -FP4_CODE])

# Symmetric absmax int4 baseline: round(w / absmax * 7) in {-7, ..., 7}; the 16th pattern is unused.
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7.0

QUANT_TYPES = ("nf4", "fp4")

NF4_OFFSET = 0.9677083  # 1/2 * [(1 - 1/(2*15)) + (1 - 1/(2*16))], QLoRA's choice of outermost quantile


def derive_nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the 16 NF4 values from standard-normal quantiles Phi^-1 (QLoRA, Sec. 3).

    positive: Phi^-1(p) for the 8 points p in linspace(offset, 1/2, 9)[:-1]
    negative: -Phi^-1(p) for the 7 points p in linspace(offset, 1/2, 8)[:-1]
    code = sort(positive U {0} U negative) / max   -> 7 negative, 0, 8 positive, ends exactly +-1.

    The asymmetry gives an exact zero while using all 16 patterns.
    """
    if not (0.5 < offset < 1.0):
        raise ValueError(f"offset must be in (0.5, 1), got {offset}")
    # probabilities in fp32, quantiles in fp64: the precision path of the reference table
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()  # normalised in fp32, as bitsandbytes does, so the table matches bit for bit


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic data type used for double quantisation (Dettmers, 2016; bitsandbytes).

    For exponent e = 0..E-1 (E = max_exponent_bits) the values are 10^(e - (E-1)) times the
    midpoints of linspace(0.1, 1, n_e + 1), with n_e = 2^(e + total_bits - 1 - E) fractions
    (twice as many when unsigned), mirrored for the sign; plus 0 and 1. Sorted ascending.
    Default (signed, 7, 8): 127 negative values, 0, 128 positive (largest 1.0, smallest -0.99296875).
    """
    non_sign_bits = total_bits - 1
    values = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for e in range(max_exponent_bits):
        n_fractions = 2 ** (e + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, n_fractions + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2
        scale = 10.0 ** (e - (max_exponent_bits - 1))
        values.append(scale * fractions)
        if signed:
            values.append(-scale * fractions)
    code = torch.cat(values).sort().values
    if code.numel() != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits}) "
            f"gives {code.numel()} values, not 2**total_bits"
        )
    return code


DYNAMIC_MAP = create_dynamic_map()


def get_4bit_code(quant_type: str) -> torch.Tensor:
    """The 16-value code table of `quant_type` ("nf4" or "fp4"), index = 4-bit pattern."""
    _check_quant_type(quant_type)
    return (NF4_CODE if quant_type == "nf4" else FP4_CODE).clone()


# ====================================================================================================
# 2. the readable path: QLoRA's equations, one function each, on the whole tensor at once


def _to_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten row-major, zero-pad to whole blocks: (n,) -> (ceil(n / blocksize), blocksize).

    Zeros never raise a block's absmax, so a partial last block is quantised as if it stood alone.
    """
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, blocksize)  # (n_blocks, blocksize)


def nearest_code_reference(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """q = argmin_j |x - code_j| (uint8, same shape as x); an exact tie goes to the lower code value.

    Nearest-code search is the same as asking which midpoints between neighbouring sorted codes x lies
    between: `bucketize` returns the rank r with mid[r-1] < x <= mid[r], so a value sitting exactly on a
    midpoint is sent to the lower code (bitsandbytes' rule). Comparing with midpoints, rather than
    computing |x - code_j| in floating point, makes the tie rule exact.
    """
    sorted_code, order = code.sort(stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2  # (len(code) - 1,)
    rank = torch.bucketize(x, midpoints)
    return order[rank].to(torch.uint8)  # rank in sorted order -> index in `code` (differs for FP4)


def _reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """1 / absmax, with an all-zero block mapped to a finite scale (its values stay 0, not NaN).

    Quantisation multiplies by this reciprocal instead of dividing by absmax because that is how
    bitsandbytes rounds: x * (1/a) and x / a can differ in the last bit, and we want their bytes.
    """
    return 1.0 / absmax.clamp(min=1e-38)


def quantize_blockwise_reference(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation to indices into `code` (values in [-1, 1]):

        absmax_b = max_{i in b} |x_i|
        q_i      = argmin_j |x_i / absmax_b - code_j|      (an exact tie goes to the lower code)

    Returns (q, absmax): q uint8 of shape (x.numel(),), absmax fp32 of shape (ceil(n / blocksize),).
    A partial last block gets its own absmax.
    """
    _check_blockwise_args(x, code, blocksize)
    # BEGIN ASSIGNMENT nf4-blockwise
    blocks = _to_blocks(x.detach().float(), blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    _check_finite(absmax)
    # the product can round to just above 1 in magnitude; the codes end at +-1
    scaled = (blocks * _reciprocal(absmax).unsqueeze(1)).clamp(-1, 1)  # (n_blocks, blocksize)
    q = nearest_code_reference(scaled, code.to(device=x.device, dtype=torch.float32))  # (n_blocks, blocksize)
    return q.reshape(-1)[: x.numel()], absmax
    # END ASSIGNMENT


def dequantize_blockwise_reference(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Inverse of `quantize_blockwise_reference`: x_i ~= code[q_i] * absmax_{i // blocksize}, fp32 (n,)."""
    n = q.numel()
    _check_absmax_count(n, absmax, blocksize)
    # BEGIN ASSIGNMENT nf4-blockwise
    values = code.to(device=q.device, dtype=torch.float32)[q.reshape(-1).long()]  # (n,)
    blocks = _to_blocks(values, blocksize)  # (n_blocks, blocksize)
    return (blocks * absmax.float().unsqueeze(1)).reshape(-1)[:n]
    # END ASSIGNMENT


@dataclass
class QuantState4bit:
    """Everything needed to dequantise a 4-bit tensor.

    packed:        uint8 (ceil(n/2),), element 2i in the high nibble, 2i+1 in the low nibble
    code:          the 16-value table (a shared constant; not counted in `nbytes`)
    absmax:        fp32 (n_blocks,) per-block scales, or None with double quantisation, where instead
    absmax_q:      uint8 (n_blocks,) dynamic-map codes of absmax - absmax_offset,
    absmax_scale:  fp32 (ceil(n_blocks / dq_blocksize),) their per-block scales,
    absmax_offset: fp32 scalar, mean of the original absmax,
    absmax_code:   the 256-value dynamic map (shared constant; not counted in `nbytes`).
    """

    packed: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    absmax_code: torch.Tensor | None = None
    dq_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def stored_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the weight (code tables excluded: they are shared constants)."""
        if self.double_quant:
            return [self.packed, self.absmax_q, self.absmax_scale, self.absmax_offset]
        return [self.packed, self.absmax]

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes + absmax (or its double-quantised form)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    @property
    def bits_per_param(self) -> float:
        """8 * nbytes / numel: 4.5 for blocksize 64, ~4.127 with double quantisation."""
        return 8 * self.nbytes / self.numel


def pack_4bit(q: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte: byte_i = (q[2i] << 4) | q[2i+1]; (n,) -> (ceil(n/2),) uint8.

    An odd n is padded with the index of 0.0 in `code`, so the spare nibble decodes to zero.
    """
    q = q.reshape(-1)
    if q.numel() % 2:
        zero = torch.zeros(1, dtype=torch.float32, device=q.device)
        q = torch.cat([q, nearest_code_reference(zero, code.to(q.device, torch.float32))])
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: q[2i] = byte_i >> 4, q[2i+1] = byte_i & 15; (ceil(n/2),) -> (n,) uint8."""
    pairs = torch.stack([packed >> 4, packed & 15], dim=1)  # (n_bytes, 2), high nibble first
    return pairs.reshape(-1)[:n]


def double_quantize_reference(
    absmax: torch.Tensor, dq_blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise the fp32 absmax constants themselves to 8 bits (QLoRA, Sec. 3, "Double Quantization"):

        c = mean(absmax);   (absmax_q, absmax_scale) = quantize_blockwise(absmax - c, dyn, dq_blocksize)

    Returns (absmax_q uint8 (n_blocks,), absmax_scale fp32 (ceil(n_blocks / dq_blocksize),), c, dyn).
    """
    # BEGIN ASSIGNMENT nf4-blockwise
    offset = absmax.mean()  # absmax > 0, so centring makes the signed 8-bit map useful
    # a copy owned by the state: registered as a module buffer, it must not alias the shared constant
    dynamic_map = DYNAMIC_MAP.to(absmax.device, copy=True)
    absmax_q, absmax_scale = quantize_blockwise_reference(absmax - offset, dynamic_map, dq_blocksize)
    return absmax_q, absmax_scale, offset, dynamic_map
    # END ASSIGNMENT


def quantize_4bit_reference(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    dq_blocksize: int = 256,
) -> QuantState4bit:
    """Quantise `w` to 4 bits per value with one absmax per `blocksize` values (QLoRA's NF4 by default):

        q_i = argmin_j |w_i / absmax_b - code_j|,   packed two per byte,
        absmax stored in fp32, or with `double_quant` as 8-bit codes of (absmax - mean(absmax)).
    """
    _check_4bit_args(w, blocksize, quant_type, double_quant, dq_blocksize)
    code = get_4bit_code(quant_type).to(w.device)
    q, absmax = quantize_blockwise_reference(w, code, blocksize)  # (n,), (n_blocks,)
    state = QuantState4bit(pack_4bit(q, code), code, w.shape, w.dtype, blocksize, quant_type)
    if not double_quant:
        state.absmax = absmax
        return state
    state.absmax_q, state.absmax_scale, state.absmax_offset, state.absmax_code = double_quantize_reference(
        absmax, dq_blocksize
    )
    state.dq_blocksize = dq_blocksize
    return state


def dequantize_absmax_reference(state: QuantState4bit) -> torch.Tensor:
    """Per-block fp32 scales: absmax, or absmax_b ~= dyn[absmax_q_b] * absmax_scale_{b // dq_blocksize} + c."""
    if not state.double_quant:
        return state.absmax.float()
    centred = dequantize_blockwise_reference(state.absmax_q, state.absmax_scale, state.absmax_code, state.dq_blocksize)
    return centred + state.absmax_offset


def dequantize_4bit_reference(state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w_i ~= code[q_i] * absmax_{i // blocksize}, computed in fp32, returned as `dtype` (default state.dtype)."""
    _check_state(state)
    q = unpack_4bit(state.packed, state.numel)  # (n,)
    absmax = dequantize_absmax_reference(state)  # (n_blocks,)
    w = dequantize_blockwise_reference(q, absmax, state.code, state.blocksize)  # (n,) fp32
    return w.view(state.shape).to(dtype or state.dtype)


# ====================================================================================================
# 3. fast path: the same numbers, faster
#
# Two costs dominate the readable path on large matrices: `bucketize` is a binary search per value, and
# every step allocates a full-size temporary. The fast path replaces the search with a lookup table
# (`_cell_table`), decodes a whole byte with one gather (`_byte_table`), and walks the matrix in chunks
# of ~1M values so the temporaries stay in cache and are reused. Every function here returns exactly
# the bits of its `_reference` twin (tests/test_nf4.py).

_MAX_CELLS_PER_UNIT = 2**12


def _cell_table(code: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """Lookup tables that make nearest-code search one multiply, two gathers and one compare.

    Cut [-1, 1] into cells of width 1/k (k a power of two) narrow enough that each cell holds at most
    one distinct midpoint m_c between neighbouring codes. For x in cell c every x <= m_c has the same
    nearest code (low_c) and every x > m_c has the same one (high_c). Returns (k, m, patterns) with
    m: (2k+1,) midpoint per cell (+inf where none), patterns: (2k+1, 2) uint8 flattened as [low_c, high_c].
    None when k would exceed 2^12 (the 8-bit dynamic map has midpoints 1e-7 apart).
    """
    sorted_code, order = code.sort(stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    distinct = midpoints.unique()
    min_gap = (distinct[1:] - distinct[:-1]).min().item() if distinct.numel() > 1 else 1.0
    k = 2 ** math.ceil(math.log2(1.0 / min_gap))  # cell width 1/k <= min_gap: <= 1 midpoint per cell
    if k > _MAX_CELLS_PER_UNIT:
        return None
    cell_of_mid = (torch.floor(distinct * k) + k).long()
    m = torch.full((2 * k + 1,), math.inf, dtype=code.dtype, device=code.device)
    m[cell_of_mid] = distinct
    left = (torch.arange(2 * k + 1, dtype=code.dtype, device=code.device) - k) / k  # exact: k is a power of 2
    low = order[torch.bucketize(left, midpoints)]  # x in [left_c, m_c]: same rank as left_c
    high = order[torch.bucketize(m, midpoints, right=True)]  # x in (m_c, right_c): rank just above m_c
    return k, m, torch.stack([low, high], dim=1).view(-1).to(torch.uint8)


def nearest_code_fast(
    x: torch.Tensor, code: torch.Tensor, table: tuple[int, torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Same result as `nearest_code_reference` for x in [-1, 1] (uint8, flattened), via `_cell_table`.

    cell = floor(x * k) + k is exact (k is a power of two); index = patterns[2 cell + (x > m_cell)].
    """
    if table is None:
        return nearest_code_reference(x.reshape(-1), code)
    k, m, patterns = table
    x = x.reshape(-1)
    cell = (x * k).floor_().to(torch.int32).add_(k)  # (n,)
    above = x > m.index_select(0, cell)
    return patterns.index_select(0, cell.mul_(2).add_(above))


# Values handled per step: temporaries of a few MB stay in cache and their memory is reused, which
# is ~3x faster on CPU than one pass over a large matrix and bounds the extra memory on GPU.
_CHUNK = 2**20


def _blocks_per_chunk(blocksize: int) -> int:
    return max(1, _CHUNK // blocksize)


def quantize_blockwise_fast(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise_reference`, chunk by chunk, with `nearest_code_fast`: same (q, absmax)."""
    _check_blockwise_args(x, code, blocksize)
    code = code.to(device=x.device, dtype=torch.float32)
    table = _cell_table(code)
    blocks = _to_blocks(x.detach().float(), blocksize)  # (n_blocks, blocksize)
    step = _blocks_per_chunk(blocksize)
    q_parts, absmax_parts = [], []
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step]  # (<= step, blocksize)
        absmax = chunk.abs().amax(dim=1)
        _check_finite(absmax)
        scaled = (chunk * _reciprocal(absmax).unsqueeze(1)).clamp_(-1, 1)
        q_parts.append(nearest_code_fast(scaled, code, table))
        absmax_parts.append(absmax)
    return torch.cat(q_parts)[: x.numel()], torch.cat(absmax_parts)


def dequantize_blockwise_fast(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """`dequantize_blockwise_reference`, chunk by chunk, gathering and scaling in place: same fp32 (n,)."""
    n = q.numel()
    _check_absmax_count(n, absmax, blocksize)
    code, q, absmax = code.to(device=q.device, dtype=torch.float32), q.reshape(-1).int(), absmax.float()
    n_blocks = absmax.numel()
    flat = torch.empty(n_blocks * blocksize, dtype=torch.float32, device=q.device)
    flat[n:] = 0  # padding of a partial last block
    out = flat.view(n_blocks, blocksize)
    step = _blocks_per_chunk(blocksize)
    for start in range(0, n_blocks, step):
        first, last = start * blocksize, min((start + step) * blocksize, n)
        torch.index_select(code, 0, q[first:last], out=flat[first:last])
        out[start : start + step].mul_(absmax[start : start + step].unsqueeze(1))
    return flat[:n]


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) fp32: row b = (code[b >> 4], code[b & 15]), the two values packed in byte b.

    One gather per byte then decodes both nibbles, high nibble first, with no unpacking step.
    """
    code = code.float()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def quantize_4bit_fast(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    dq_blocksize: int = 256,
) -> QuantState4bit:
    """`quantize_4bit_reference` with `quantize_blockwise_fast` for both levels: the same state, bit for bit."""
    _check_4bit_args(w, blocksize, quant_type, double_quant, dq_blocksize)
    code = get_4bit_code(quant_type).to(w.device)
    q, absmax = quantize_blockwise_fast(w, code, blocksize)
    state = QuantState4bit(pack_4bit(q, code), code, w.shape, w.dtype, blocksize, quant_type)
    if not double_quant:
        state.absmax = absmax
        return state
    offset = absmax.mean()
    dynamic_map = DYNAMIC_MAP.to(w.device, copy=True)
    state.absmax_q, state.absmax_scale = quantize_blockwise_fast(absmax - offset, dynamic_map, dq_blocksize)
    state.absmax_offset, state.absmax_code, state.dq_blocksize = offset, dynamic_map, dq_blocksize
    return state


def dequantize_absmax_fast(q: QuantState4bit) -> torch.Tensor:
    """`dequantize_absmax_reference` with `dequantize_blockwise_fast`: the same per-block fp32 scales."""
    if not q.double_quant:
        return q.absmax.float()
    return dequantize_blockwise_fast(q.absmax_q, q.absmax_scale, q.absmax_code, q.dq_blocksize) + q.absmax_offset


def dequantize_4bit_fast(q: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_4bit_reference` without unpacking: bytes -> value pairs via `_byte_table`, in chunks."""
    _check_state(q)
    n, blocksize = q.numel, q.blocksize
    absmax = dequantize_absmax_fast(q)  # (n_blocks,)
    n_blocks, n_bytes = absmax.numel(), q.packed.numel()
    pairs = _byte_table(q.code.to(q.packed.device))  # (256, 2)
    flat = torch.empty(max(n_blocks * blocksize, 2 * n_bytes), dtype=torch.float32, device=q.packed.device)
    flat[2 * n_bytes :] = 0  # padding of a partial last block
    out = flat[: n_blocks * blocksize].view(n_blocks, blocksize)
    step = _blocks_per_chunk(blocksize)
    for start in range(0, n_blocks, step):  # chunks of whole blocks; every chunk but the last has even size
        first, last = start * blocksize, min(start + step, n_blocks) * blocksize
        packed = q.packed[first // 2 : (last + 1) // 2]
        torch.index_select(pairs, 0, packed.int(), out=flat[first : first + 2 * packed.numel()].view(-1, 2))
        out[start : start + step].mul_(absmax[start : start + step].unsqueeze(1))
    return flat[:n].view(q.shape).to(dtype or q.dtype)


# ====================================================================================================
# 4. public API: the fast path (bit-identical to the readable one, and to bitsandbytes)

quantize_blockwise = quantize_blockwise_fast
dequantize_blockwise = dequantize_blockwise_fast
quantize_4bit = quantize_4bit_fast
dequantize_4bit = dequantize_4bit_fast
dequantize_absmax = dequantize_absmax_fast


def quantization_error(
    w: torch.Tensor, quant_type: str, blocksize: int = 64, double_quant: bool = False
) -> dict[str, float]:
    """Mean squared and maximum absolute error of quantise -> dequantise, for "nf4", "fp4" or "int4".

    int4 is the symmetric absmax baseline: w ~= round(7 w / absmax) * absmax / 7.
    """
    _check_tensor(w, "w")
    if quant_type not in QUANT_TYPES + ("int4",):
        raise ValueError(f"quant_type must be one of {QUANT_TYPES + ('int4',)}, got {quant_type!r}")
    if quant_type == "int4":
        q, absmax = quantize_blockwise(w, INT4_CODE, blocksize)
        w_hat = dequantize_blockwise(q, absmax, INT4_CODE, blocksize).view(w.shape)
    else:
        w_hat = dequantize_4bit(quantize_4bit(w, blocksize, quant_type, double_quant), torch.float32)
    err = (w.float() - w_hat).flatten()
    return {"mse": err.square().mean().item(), "max_abs": err.abs().max().item()}


# ====================================================================================================
# input checks: both paths raise the same errors for the same bad input


def _check_tensor(w: object, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(w.shape)}")


def _check_blocksize(blocksize: object, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a positive power of two, got {blocksize!r}")


def _check_quant_type(quant_type: object) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blockwise_args(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    _check_tensor(x, "x")
    _check_blocksize(blocksize)
    if code.numel() > 256:
        raise ValueError(f"code has {code.numel()} entries; uint8 indices hold at most 256")


def _check_finite(absmax: torch.Tensor) -> None:
    # a NaN/inf would propagate to every code in its block
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("x contains NaN or infinite values; they cannot be quantised")


def _check_absmax_count(n: int, absmax: torch.Tensor, blocksize: int) -> None:
    _check_blocksize(blocksize)
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"absmax has {absmax.numel()} entries but {n} codes in blocks of {blocksize} need {-(-n // blocksize)}"
        )


def _check_4bit_args(
    w: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool, dq_blocksize: int
) -> None:
    _check_tensor(w, "w")
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if double_quant:
        _check_blocksize(dq_blocksize, "dq_blocksize")


def _check_state(q: QuantState4bit) -> None:
    if not isinstance(q, QuantState4bit):
        raise TypeError(f"q must be a QuantState4bit, got {type(q).__name__}")
    n_bytes, n_blocks = -(-q.numel // 2), -(-q.numel // q.blocksize)
    if q.packed.dtype != torch.uint8 or q.packed.numel() != n_bytes:
        raise ValueError(
            f"q.packed holds {q.packed.numel()} {q.packed.dtype} values, but q.shape {tuple(q.shape)} "
            f"needs {n_bytes} uint8 bytes"
        )
    absmax = q.absmax_q if q.double_quant else q.absmax
    if absmax is None or absmax.numel() != n_blocks:
        got = None if absmax is None else absmax.numel()
        raise ValueError(
            f"q has {got} absmax values, but q.shape {tuple(q.shape)} in blocks of {q.blocksize} needs {n_blocks}"
        )
    if q.double_quant and q.absmax_scale.numel() != -(-n_blocks // q.dq_blocksize):
        raise ValueError(
            f"q.absmax_scale has {q.absmax_scale.numel()} values, but {n_blocks} absmax values in blocks of "
            f"{q.dq_blocksize} need {-(-n_blocks // q.dq_blocksize)}"
        )
