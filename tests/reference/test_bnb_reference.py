"""Conformance of minillm.quant.nf4 with bitsandbytes' 4-bit quantisation (skipped without bitsandbytes).

Compared: code tables, the dynamic map, packed bytes, absmax, double-quantisation statistics and
dequantised values, for NF4 and FP4, with and without double quantisation, on CPU (bitsandbytes >= 0.47
runs 4-bit quantisation on CPU in its pure-PyTorch "default" backend).

Two bitsandbytes CPU kernels are native C++ and deviate from the library's own reference semantics, so
those comparisons go through the device-agnostic default backend (dispatch key
CompositeExplicitAutograd) instead:
- `quantize_blockwise` (used for double quantisation): the C++ search sometimes picks the second-nearest
  8-bit code near a midpoint; the public path is still checked to agree up to that (ours is never farther).
- `dequantize_4bit` assumes blocks do not cross rows, so it is wrong when the last dimension is not a
  multiple of the blocksize; the public path is checked where it is valid.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

from minillm.quant.nf4 import (  # noqa: E402
    FP4_CODE,
    NF4_CODE,
    create_dynamic_map,
    dequantize_4bit,
    dequantize_absmax,
    derive_nf4_code,
    quantize_4bit,
    quantize_blockwise,
)


@pytest.fixture(autouse=True, scope="module")
def eager():
    """bitsandbytes wraps its default kernels in torch.compile; eager runs the same maths without compile time."""
    with torch.compiler.set_stance("force_eager"):
        yield


DEFAULT_BACKEND = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

SHAPES = [(64, 64), (100, 37), (7,), (3, 5, 31), (300, 257), (1, 4096)]


def bnb_default_quantize_blockwise(x, code, blocksize):
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(DEFAULT_BACKEND, x, code, blocksize)


def bnb_default_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype):
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    return op.redispatch(DEFAULT_BACKEND, packed, absmax, blocksize, quant_type, list(shape), dtype)


def test_code_tables():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(create_dynamic_map(), bnbf.create_dynamic_map())
    assert torch.equal(create_dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))


def test_derived_nf4_matches_create_normal_map():
    pytest.importorskip("scipy")  # bitsandbytes derives NF4 with scipy.stats.norm.ppf
    full = bnbf.create_normal_map()  # 7 negative values, 241 zeros, 8 positive values
    assert torch.equal(derive_nf4_code(), torch.cat([full[:7], full[7:8], full[-8:]]))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_4bit_without_double_quant(quant_type, blocksize, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    ours = quantize_4bit(w, blocksize, quant_type, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    reference = bnb_default_dequantize_4bit(packed, state.absmax, blocksize, quant_type, shape, torch.float32)
    assert torch.equal(dequantize_4bit(ours), reference)
    if shape[-1] % blocksize == 0:  # where the native CPU kernel is valid
        assert torch.equal(dequantize_4bit(ours), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    torch.manual_seed(1)
    w = torch.randn(64, 128).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_4bit(w, 64, "nf4", double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_4bit(ours), bnbf.dequantize_4bit(packed, state))


def test_dynamic_blockwise_quantisation_matches_default_backend():
    torch.manual_seed(2)
    x = torch.randn(5000) * torch.rand(5000)
    code = bnbf.create_dynamic_map()
    q_ref, absmax_ref = bnb_default_quantize_blockwise(x, code, 256)
    q, absmax = quantize_blockwise(x, code, 256)
    assert torch.equal(q, q_ref.view(-1)) and torch.equal(absmax, absmax_ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 64), (100, 37), (300, 257), (128, 1024)], ids=str)
def test_double_quantisation(quant_type, shape):
    torch.manual_seed(3)
    w = torch.randn(shape) * torch.rand(shape[0], 1)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    ours = quantize_4bit(w, 64, quant_type, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    assert state.state2.blocksize == ours.dq_blocksize == 256
    assert torch.equal(ours.absmax_code, state.state2.code)
    # the default backend's semantics: identical codes and values
    plain_absmax = quantize_4bit(w, 64, quant_type, double_quant=False).absmax
    q_ref, _ = bnb_default_quantize_blockwise(plain_absmax - state.offset, state.state2.code, 256)
    assert torch.equal(ours.absmax_q, q_ref.view(-1))
    absmax_ref = bnbf.dequantize_blockwise(q_ref, state.state2) + state.offset
    assert torch.equal(dequantize_absmax(ours), absmax_ref)
    reference = bnb_default_dequantize_4bit(packed, absmax_ref, 64, quant_type, shape, torch.float32)
    assert torch.equal(dequantize_4bit(ours), reference)
    # the public (native C++) path: same codes except rare near-ties, where ours is at least as near
    differ = ours.absmax_q != state.absmax
    assert differ.float().mean() < 0.02
    code, scale = state.state2.code, ours.absmax_scale.repeat_interleave(256)[: plain_absmax.numel()]
    target = (plain_absmax - state.offset) / scale
    ours_err = (code[ours.absmax_q.long()] - target).abs()
    theirs_err = (code[state.absmax.long()] - target).abs()
    assert bool((ours_err[differ] <= theirs_err[differ] + 1e-7).all())
