"""MX on hardware: E8M0 codes, cuBLAS's blocked scale layout, and where the kernel runs.

The block-scaled ``torch._scaled_mm`` needs a Blackwell GPU, so on a CPU what is tested is
everything it is given: the scale codes (against torch's own E8M0 cast), their layout
(against torchao's ``to_blocked`` and ``from_blocked``), the
detection of supported devices, and the refusal of an explicit request where it is missing.
"""

from __future__ import annotations

import pytest
import torch

from mixprec.float8 import Float8Config, Float8Linear, mx_dequantize, mx_to_float8
from mixprec.float8.mx_gemm import (
    DeviceFacts,
    e8m0_codes,
    mx_scaled_mm,
    mx_scaled_mm_operands,
    mx_scaled_mm_support,
    to_blocked,
)

E4M3 = torch.float8_e4m3fn
SHAPES = [(1, 1), (3, 2), (128, 4), (130, 5), (257, 33), (64, 12), (512, 8)]


def _facts(**kw) -> DeviceFacts:
    base = dict(device="cuda:0", name="NVIDIA B200", capability=(10, 0), torch_version="2.8.0",
                cuda_version="12.8", hip=False, e8m0=True)  # fmt: skip
    return DeviceFacts(**{**base, **kw})


@pytest.mark.parametrize("shape", SHAPES)
def test_to_blocked_matches_torchao(shape):
    ao = pytest.importorskip("torchao.prototype.mx_formats.utils")
    scales = torch.randint(0, 255, shape, dtype=torch.uint8)
    assert torch.equal(to_blocked(scales), ao.to_blocked(scales))


def test_e8m0_codes_match_torchs_cast_for_every_exponent():
    X = torch.tensor([2.0**e for e in range(-127, 128)], dtype=torch.float32)  # noqa: N806
    codes = e8m0_codes(X)
    assert torch.equal(codes, X.to(torch.float8_e8m0fnu).view(torch.uint8))
    assert torch.equal(codes, torch.arange(255, dtype=torch.uint8))


@pytest.mark.parametrize(("m", "k", "n"), [(40, 96, 64), (130, 80, 24), (1, 32, 16)])
def test_scaled_mm_operands_decode_to_the_mx_operands(m, k, n):
    # Decoded with torchao's from_blocked (an independent inverse of the layout), the
    # scales and elements handed to torch._scaled_mm are exactly the MX operands.
    ao = pytest.importorskip("torchao.prototype.mx_formats.utils")
    torch.manual_seed(0)
    a = torch.randn(m, k) * torch.logspace(-3, 3, k)
    b = torch.randn(k, n) * torch.logspace(3, -3, k)[:, None]
    qa, xa = mx_to_float8(a, -1, E4M3)
    qb, xb = mx_to_float8(b, 0, E4M3)
    A, B, sa, sb, cols = mx_scaled_mm_operands(qa, xa, qb, xb)  # noqa: N806
    kp, np_ = qa.shape[1], B.shape[1]
    assert cols == n and np_ % 16 == 0 and kp % 32 == 0
    assert A.is_contiguous() and B.t().is_contiguous()  # row-major a, column-major b
    assert sa.numel() == -(-m // 128) * 128 * -(-kp // 32 // 4) * 4
    assert sb.numel() == -(-np_ // 128) * 128 * -(-kp // 32 // 4) * 4

    def decode(elements, blocked, rows):  # (rows, K') values, float64
        codes = ao.from_blocked(blocked, rows, kp // 32).to(torch.float64)
        return elements.to(torch.float64) * torch.exp2(codes - 127).repeat_interleave(32, 1)

    assert torch.equal(decode(A, sa, m), mx_dequantize(qa, xa, -1).double())
    want_b = mx_dequantize(qb, xb, 0).double().t()  # (N, K')
    assert torch.equal(decode(B.t(), sb, np_)[:n], want_b)
    assert not decode(B.t(), sb, np_)[n:].any()  # the padded columns are zero


def test_support_names_the_device_and_the_reason():
    ok, reason = mx_scaled_mm_support("cpu")
    assert not ok and reason.startswith("cpu:")
    assert mx_scaled_mm_support("cuda:0", E4M3, E4M3, facts=_facts()) == (
        True,
        "cuda:0 (NVIDIA B200, sm_100): torch 2.8.0, CUDA 12.8",
    )
    refused = {
        "compute capability 9.0": _facts(name="NVIDIA H100 80GB HBM3", capability=(9, 0)),
        "torch 2.6.0 has no float8_e8m0fnu": _facts(torch_version="2.6.0"),
        "CUDA 12.6": _facts(cuda_version="12.6"),
        "ROCm": _facts(hip=True),
        "no CUDA device": _facts(capability=None),
    }
    for why, facts in refused.items():
        ok, reason = mx_scaled_mm_support("cuda:0", facts=facts)
        assert not ok and why in reason and reason.startswith("cuda:0"), reason
    ok, reason = mx_scaled_mm_support("cuda:0", torch.float8_e5m2, E4M3, facts=_facts())
    assert not ok and "float8_e4m3fn x float8_e4m3fn" in reason
    assert mx_scaled_mm_support("cuda:0", facts=_facts(capability=(12, 0)))[0]  # sm_120


def test_explicit_request_for_the_mx_kernel_raises_where_it_is_missing():
    x = torch.randn(8, 64)
    mxfp8 = Float8Config.from_recipe_name
    explicit = Float8Linear(64, 32, config=mxfp8("mxfp8", backend="scaled_mm"))
    with pytest.raises(RuntimeError, match="backend='scaled_mm'.*cpu: the MX kernel"):
        explicit(x)
    auto = Float8Linear(64, 32, config=mxfp8("mxfp8"))
    auto.load_state_dict(explicit.state_dict())
    emulated = Float8Linear(64, 32, config=mxfp8("mxfp8", backend="emulate"))
    emulated.load_state_dict(explicit.state_dict())
    assert torch.equal(auto(x), emulated(x))  # auto on a CPU: the emulation, as documented


@pytest.mark.skipif(
    not mx_scaled_mm_support("cuda", E4M3, E4M3)[0], reason=mx_scaled_mm_support("cuda")[1]
)
def test_mx_kernel_matches_the_emulation_on_blackwell():  # runs only where it is real
    torch.manual_seed(0)
    a, b = torch.randn(256, 512, device="cuda"), torch.randn(512, 128, device="cuda")
    qa, xa = mx_to_float8(a, -1, E4M3)
    qb, xb = mx_to_float8(b, 0, E4M3)
    got = mx_scaled_mm(qa, xa, qb, xb, torch.float32).double()
    da, db = mx_dequantize(qa, xa, -1).double(), mx_dequantize(qb, xb, 0).double()
    exact = da @ db
    bound = (da.abs() @ db.abs()) * (512 * 2.0**-24) + exact.abs() * 2.0**-24
    assert ((got - exact).abs() <= bound).all()
