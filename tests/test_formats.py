"""Tests for mixprec.formats: derived limits, quantize vs independent oracles, decode/explain, CLI.

Oracles: ml_dtypes' conversions (bit for bit), torch's own casts, torch.finfo /
ml_dtypes.finfo, and an exact rational-arithmetic rounding written here from the IEEE rules.

Where the references disagree with quantize (and why) -- asserted below, not skipped:
* fp6/fp4 have no NaN: ml_dtypes turns NaN into ±0; quantize keeps NaN (a NaN in training
  should stay visible).
* e8m0fnu from float32/bfloat16 subnormals in [2^-127, 1.5 * 2^-127): torch and ml_dtypes
  before 0.7 give 2^-126; the nearest value (and quantize's answer) is 2^-127. There the
  tests compare quantize with the exact oracle, whatever the installed ml_dtypes does.
* torch's float8_e4m3fn cast saturates (finite and infinite inputs go to ±448), where
  ml_dtypes gives NaN: it equals quantize(..., overflow="saturate").
* torch casts 0 to float8_e8m0fnu's smallest value 2^-127; ml_dtypes (and quantize) give
  NaN, as e8m0 has no zero.
* torch.finfo(torch.float8_e5m2fnuz).eps is 0.125; the layout (2 mantissa bits) and
  ml_dtypes give 0.25.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec import cli
from mixprec.formats import FORMAT_ALIASES, FORMATS, FloatFormat, decode, explain, get_format
from mixprec.formats import quantize as q

from .conftest import FORMAT_NAMES

# ---- references ------------------------------------------------------------------------------
# The numpy / ml_dtypes type for each format that has one (tf32 has none). The IEEE-style
# custom layouts e3m4 and e4m3 exist in ml_dtypes too, so the general algorithm is checked on
# layouts outside the registry.
ML = {
    "fp64": np.float64,
    "fp32": np.float32,
    "fp16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "fp6_e3m2fn": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3fn": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1fn": ml_dtypes.float4_e2m1fn,
    "e8m0fnu": ml_dtypes.float8_e8m0fnu,
    "e3m4": ml_dtypes.float8_e3m4,
}
ML_CUSTOM = {"ieee_e4m3": (FloatFormat.custom(4, 3), ml_dtypes.float8_e4m3)}
ML_NAMES = [n for n in ML if ML[n] is not None]


def fmt_of(name: str) -> FloatFormat:
    return ML_CUSTOM[name][0] if name in ML_CUSTOM else get_format(name)


def ml_of(name: str):
    return ML_CUSTOM[name][1] if name in ML_CUSTOM else ML[name]


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit dtype."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def grid_values(ml_type) -> np.ndarray:
    """Sorted finite values of an <= 8-bit ml_dtypes type, from all its bit patterns."""
    bits = ml_dtypes.finfo(ml_type).bits
    v = np.arange(2**bits, dtype=np.uint8 if bits <= 8 else np.uint16)
    with np.errstate(invalid="ignore"):
        v = v.view(ml_type).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def tricky_fp32(fmt: FloatFormat, ml_type, rng: np.random.Generator, n_random: int) -> np.ndarray:
    """Random bit patterns (every class: NaN, inf, subnormal...) plus exact ties, values
    one fp32 ulp either side of them, every representable value, max and beyond, ±0, ±inf."""
    parts = [rng.integers(0, 2**32, size=n_random, dtype=np.uint64).astype(np.uint32)
             .view(np.float32)]  # fmt: skip
    if ml_dtypes.finfo(ml_type).bits <= 8:
        g = grid_values(ml_type)
        mids = ((g[1:] + g[:-1]) / 2).astype(np.float32)  # exact ties (fit in fp32)
        parts += [g.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                  np.nextafter(mids, np.float32(-np.inf))]  # fmt: skip
    mx = min(fmt.max, 3.4e38)
    parts.append(
        np.array(
            [
                0.0,
                -0.0,
                np.inf,
                -np.inf,
                np.nan,
                mx,
                mx * 1.0001,
                mx * 1.5,
                mx * 2,
                fmt.min_subnormal,
                fmt.min_subnormal / 2,
                fmt.min_subnormal * 0.75,
                fmt.min_normal,
            ]
        ).astype(np.float32)
    )
    # a dense sweep through the subnormal range and across the normal range
    lo, hi = math.log2(max(fmt.min_subnormal, 2**-149)) - 2, min(math.log2(fmt.max) + 2, 127)
    parts.append(np.exp2(rng.uniform(lo, hi, size=n_random // 4)).astype(np.float32))
    x = np.concatenate(parts)
    return np.concatenate([x, -x])


tricky_fp32 = np.errstate(over="ignore", invalid="ignore")(tricky_fp32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise: identical bit patterns, or both NaN."""
    ia, ib = (t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
              for t in (a, b))  # fmt: skip
    return (ia == ib) | (a.isnan() & b.isnan())


def ml_reference(x: torch.Tensor, ml_type) -> torch.Tensor:
    """ml_dtypes' round trip x -> format -> float32, returned in x's dtype."""
    xn = x.float().numpy()
    with np.errstate(all="ignore"):
        r = xn.astype(ml_type).astype(np.float32)
    return torch.from_numpy(r).to(x.dtype)


def known_differences(x: torch.Tensor, f: FloatFormat) -> torch.Tensor:
    """Inputs where ml_dtypes (by design or quirk) differs from quantize; see module doc."""
    xf = x.double()
    skip = torch.zeros_like(xf, dtype=torch.bool)
    if not f.has_nan:
        skip |= xf.isnan()
    if f.name == "e8m0fnu":
        skip |= (xf >= 2.0**-127) & (xf < 1.5 * 2.0**-127)
    return skip


# ---- derived properties ----------------------------------------------------------------------
def test_registry_names_and_aliases():
    assert FORMAT_NAMES == ["fp64", "fp32", "tf32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2",
                            "fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp6_e3m2fn", "fp6_e2m3fn",
                            "fp4_e2m1fn", "e8m0fnu"]  # fmt: skip
    for alias, name in FORMAT_ALIASES.items():
        assert alias not in FORMATS and get_format(alias) is FORMATS[name]
    assert get_format("HALF") is FORMATS["fp16"]
    assert get_format(torch.bfloat16) is FORMATS["bf16"]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_layout_invariants(name):
    f = FORMATS[name]
    assert f.bits == int(f.signed) + f.exponent_bits + f.mantissa_bits
    assert f.eps == 2.0**-f.mantissa_bits
    assert f.min_subnormal == f.min_normal * 2.0**-f.mantissa_bits or not f.has_zero
    assert math.isclose(f.dynamic_range_binades, math.log2(f.max) - math.log2(f.min_subnormal))
    if f.torch_dtype is not None:
        assert get_format(f.torch_dtype) is f and mp.to_torch_dtype(name) == f.torch_dtype
        assert torch.empty(0, dtype=f.torch_dtype).element_size() * 8 == f.bits


def test_to_torch_dtype_refuses_layouts_torch_cannot_store():
    with pytest.raises(ValueError, match="torch has no dtype for tf32; formats with one: fp64"):
        mp.to_torch_dtype("tf32")
    with pytest.raises(ValueError, match="no dtype for fp4_e2m1fn"):
        mp.to_torch_dtype(FORMATS["fp4_e2m1fn"])


def test_fp8_layers_take_their_dtypes_from_the_format_registry():
    from mixprec.float8 import FP8_FORMATS, Float8Config

    # written out: the signed 8-bit formats with a torch dtype (e8m0fnu is a scale format)
    assert FP8_FORMATS == ("fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz")
    for name in FP8_FORMATS:
        cfg = Float8Config(forward_format=name, backward_format=name)
        want = getattr(torch, "float8_" + name.removeprefix("fp8_"))
        assert cfg.forward_dtype is want and cfg.backward_dtype is want


def test_dtype_short_names_come_from_the_format_registry():
    """No module outside formats/ keeps its own torch dtype -> "bf16" table (issue 19)."""
    import pathlib
    import re

    src = pathlib.Path(mp.__file__).parent
    table = re.compile(r"torch\.(float64|float32|float16|bfloat16)\s*:\s*[\"'](fp|bf)\d")
    offenders = [
        f"{path.relative_to(src)}:{n}"
        for path in sorted(src.rglob("*.py"))
        if path.parent.name != "formats"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if table.search(line)
    ]
    assert offenders == [], "use get_format(dtype).name instead of a table"


@pytest.mark.parametrize("name", [n for n in FORMAT_NAMES if n in ML])
def test_limits_match_ml_dtypes_finfo(name):
    f, fi = FORMATS[name], ml_dtypes.finfo(ML[name])
    assert f.bits == fi.bits
    assert f.max == float(fi.max)
    assert f.min_normal == float(fi.smallest_normal)
    assert f.min_subnormal == float(fi.smallest_subnormal)
    assert f.eps == float(fi.eps)
    assert f.mantissa_bits == fi.nmant and f.exponent_bits == fi.nexp


@pytest.mark.parametrize("name", [n for n in FORMAT_NAMES if FORMATS[n].torch_dtype is not None])
def test_limits_match_torch_finfo(name):
    f = FORMATS[name]
    fi = torch.finfo(f.torch_dtype)
    assert (f.bits, f.max, f.min_normal) == (fi.bits, fi.max, fi.smallest_normal)
    if name == "fp8_e5m2fnuz":
        assert fi.eps == 0.125 and f.eps == 0.25  # torch's finfo is off by a factor of 2
    else:
        assert f.eps == fi.eps


def test_known_constants_and_decimal_digits():
    fp16, e4m3, e5m2 = FORMATS["fp16"], FORMATS["fp8_e4m3fn"], FORMATS["fp8_e5m2"]
    assert (fp16.max, fp16.min_normal, fp16.min_subnormal) == (65504.0, 2.0**-14, 2.0**-24)
    assert (e4m3.max, e5m2.max, FORMATS["fp4_e2m1fn"].max) == (448.0, 57344.0, 6.0)
    assert FORMATS["e8m0fnu"].max == 2.0**127 and FORMATS["e8m0fnu"].min_normal == 2.0**-127
    assert FORMATS["tf32"].bits == 19 and FORMATS["tf32"].eps == 2.0**-10
    for name, np_type in (("fp64", np.float64), ("fp32", np.float32), ("fp16", np.float16)):
        assert FORMATS[name].decimal_digits == np.finfo(np_type).precision
    assert FORMATS["bf16"].decimal_digits == ml_dtypes.finfo(ml_dtypes.bfloat16).precision
    assert not FORMATS["fp8_e4m3fnuz"].has_negative_zero and fp16.has_negative_zero
    assert not FORMATS["e8m0fnu"].has_zero


# ---- quantize vs ml_dtypes, bit for bit ------------------------------------------------------
@pytest.mark.parametrize("name", ML_NAMES + list(ML_CUSTOM))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_matches_ml_dtypes_on_every_16bit_pattern(name, dtype):
    f, x = fmt_of(name), all_patterns(dtype)
    got, ref = q(x, f), ml_reference(x, ml_of(name))
    skip = known_differences(x, f)
    assert same_bits(got, ref)[~skip].all()
    assert got.dtype == dtype
    if not f.has_nan:  # NaN stays NaN where ml_dtypes gives ±0
        assert got[x.isnan()].isnan().all()


@pytest.mark.parametrize("name", ML_NAMES + list(ML_CUSTOM))
def test_nearest_matches_ml_dtypes_on_fp32(name):
    f, ml_type = fmt_of(name), ml_of(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same inputs in every process
    x = torch.from_numpy(tricky_fp32(f, ml_type, rng, n_random=600_000))
    assert x.numel() >= 1_000_000
    got, ref = q(x, f), ml_reference(x, ml_type)
    skip = known_differences(x, f)
    bad = ~same_bits(got, ref) & ~skip
    assert not bad.any(), (x[bad][:5], got[bad][:5], ref[bad][:5])
    if f.name == "e8m0fnu":  # where ml_dtypes releases differ, the exact oracle decides
        d = (skip & x.isfinite()).nonzero().flatten()
        assert d.numel() > 0
        xs = x[d[:: max(1, d.numel() // 2000)]]
        exact = torch.tensor([oracle_nearest(float(v), f) for v in xs], dtype=torch.float32)
        assert same_bits(q(xs, f), exact).all()


def test_float64_inputs_match_exact_oracle():
    rng = np.random.default_rng(1)
    special = [0.5 + 2.0**-40, 448.0 + 16.0, 464.0 + 2.0**-30, 1e-300, -1e-310, 5e-324,
               1.7e308, -1e308, 2.0**1000 * (1 + 2.0**-21 + 2.0**-40), 3.4e38, 3.5e38]  # fmt: skip
    x = np.concatenate([rng.standard_normal(300) * 10.0 ** rng.integers(-12, 12, 300), special])
    xt = torch.tensor(x, dtype=torch.float64)
    for f in (FORMATS["fp8_e4m3fn"], FORMATS["bf16"], FORMATS["fp16"], FORMATS["fp32"],
              FormatsCustom.e2m5, FormatsCustom.e11m20, FormatsCustom.e13m18, FORMATS["tf32"],
              FORMATS["e8m0fnu"]):  # fmt: skip
        got = q(xt, f).numpy()
        ref = np.array([oracle_nearest(v, f) for v in x])
        assert same_bits(torch.from_numpy(got), torch.from_numpy(ref)).all(), f.name


# ---- an exact oracle for any layout (Python fractions, round half to even) -------------------
class FormatsCustom:
    e2m5 = FloatFormat.custom(2, 5, nan="none")
    e3m4fn = FloatFormat.custom(3, 4, nan="fn")
    e5m6 = FloatFormat.custom(5, 6)
    e11m20 = FloatFormat.custom(11, 20)
    e13m18 = FloatFormat.custom(13, 18)


def oracle_nearest(x: float, f: FloatFormat, toward_zero: bool = False) -> float:
    """Round x to f: exact rational arithmetic, ties to even (or truncation), the format's
    overflow default (truncation takes finite values beyond max to max, as in IEEE 754)."""
    if math.isnan(x):
        return math.nan
    if not f.signed and (x < 0 or (x == 0 and not f.has_zero)):
        return math.nan
    a = abs(x)
    if a == math.inf:
        r = math.inf
    else:
        e = math.frexp(a)[1] - 1 if a else f.min_exponent
        spacing = Fraction(2) ** (max(e, f.min_exponent) - f.mantissa_bits)
        n = Fraction(a) / spacing
        r = (math.floor(n) if toward_zero else round(n)) * spacing  # round(): half to even
        if toward_zero and r > f.max:
            r = Fraction(f.max)
        if not f.has_zero:
            r = max(r, Fraction(f.min_normal))
    if r > f.max:
        r = math.inf if f.has_inf else (math.nan if f.has_nan else f.max)
    r = float(r)
    if r == 0 and not f.has_negative_zero:
        return 0.0
    return math.copysign(r, x)


@pytest.mark.parametrize("f", [v for k, v in vars(FormatsCustom).items() if not k.startswith("_")]
                         + [FORMATS["tf32"]], ids=lambda f: f.name)  # fmt: skip
def test_custom_layouts_match_exact_oracle(f):
    rng = np.random.default_rng(2)
    lo, hi = math.log2(max(f.min_subnormal, 2**-149)) - 3, min(math.log2(f.max) + 2, 127)
    mags = np.exp2(rng.uniform(lo, hi, 3000)).astype(np.float32)
    x = np.concatenate([mags, -mags, [0.0, -0.0, np.inf, -np.inf, np.nan]]).astype(np.float32)
    got = q(torch.from_numpy(x), f)
    ref = torch.tensor([oracle_nearest(float(v), f) for v in x], dtype=torch.float32)
    assert same_bits(got, ref).all()


# ---- quantize vs torch's own casts -----------------------------------------------------------
TORCH_CASTS = ["bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "e8m0fnu"]


@pytest.mark.parametrize("name", TORCH_CASTS)
def test_nearest_matches_torch_casts(name):
    f = FORMATS[name]
    rng = np.random.default_rng(3)
    x = torch.from_numpy(tricky_fp32(f, ML[name], rng, n_random=200_000))
    if not f.signed:
        x = x.abs()
    # torch saturates float8_e4m3fn (infinities too); everything else uses the format default
    overflow = "saturate" if name == "fp8_e4m3fn" else None
    got = q(x, f, overflow=overflow)
    ref = x.to(f.torch_dtype).to(torch.float32)
    skip = known_differences(x, f) | torch_differences(x, f)
    assert same_bits(got, ref)[~skip].all()
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit inputs through the same casts
        xs = all_patterns(dtype)
        xs = xs.abs() if not f.signed else xs
        ref16 = xs.to(f.torch_dtype).to(dtype)
        skip = known_differences(xs, f) | torch_differences(xs, f)
        assert same_bits(q(xs, f, overflow=overflow), ref16)[~skip].all()


@pytest.mark.parametrize(("name", "overflow"), [("fp8_e5m2", "inf"), ("fp8_e4m3fn", "saturate")])
def test_native_fast_paths_equal_the_general_algorithm(name, overflow, monkeypatch):
    """quantize takes torch's own cast where it is bit-exact; the layout-driven algorithm
    (forced here) must give the same bits, so neither path can drift from the other."""
    from mixprec.formats import rounding

    f = FORMATS[name]
    rng = np.random.default_rng(5)
    inputs = [all_patterns(torch.float16), all_patterns(torch.bfloat16),
              torch.from_numpy(tricky_fp32(f, ML[name], rng, n_random=200_000))]  # fmt: skip
    fast = [q(x, f, overflow=overflow) for x in inputs]
    assert rounding._plan(f, torch.float32, "nearest", overflow).native is not None
    monkeypatch.setattr(rounding, "_NATIVE_OVERFLOW", {})
    rounding._plan.cache_clear()
    try:
        assert rounding._plan(f, torch.float32, "nearest", overflow).native is None
        for x, got in zip(inputs, fast):
            assert same_bits(got, q(x, f, overflow=overflow)).all()
    finally:
        rounding._plan.cache_clear()


def torch_differences(x: torch.Tensor, f: FloatFormat) -> torch.Tensor:
    """torch casts 0 to e8m0's smallest value 2^-127; ml_dtypes and quantize give NaN."""
    if f.name != "e8m0fnu":
        return torch.zeros_like(x, dtype=torch.bool)
    assert (torch.zeros(1).to(f.torch_dtype).float() == 2.0**-127).all()
    return x == 0


def test_e4m3fn_overflow_modes():
    x = torch.tensor([464.0, 464.5, 480.0, 1e6, math.inf, -1e6, -math.inf])
    assert q(x, "e4m3").tolist()[:1] == [448.0]  # the tie at 464 goes to even 448
    assert q(x, "e4m3")[1:].isnan().all()
    assert q(x, "e4m3", overflow="saturate").tolist() == [448.0] * 5 + [-448.0] * 2
    e5m2 = q(x, "e5m2", overflow="nan")
    assert e5m2[[4, 6]].isinf().all() and e5m2[[3, 5]].isnan().all()  # infinities stay
    with pytest.raises(ValueError, match="has no infinities"):
        q(x, "e4m3", overflow="inf")
    with pytest.raises(ValueError, match="has no NaN"):
        q(x, "fp4", overflow="nan")


# ---- toward zero and stochastic rounding -----------------------------------------------------
SMALL = ["fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp6_e3m2fn", "fp6_e2m3fn", "fp4_e2m1fn"]


def neighbours(x: np.ndarray, ml_type) -> tuple[np.ndarray, np.ndarray]:
    """Largest representable <= x and smallest >= x, by search over every value."""
    g = grid_values(ml_type)
    hi = g[np.searchsorted(g, x, side="left")]
    lo = g[np.searchsorted(g, x, side="right") - 1]
    return lo, hi


@pytest.mark.parametrize("name", [*SMALL, "bf16"])  # bf16 from fp32: the bit-pattern path
def test_toward_zero_and_stochastic_return_a_neighbour(name):
    f, ml_type = FORMATS[name], ML[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(100_000, dtype=torch.float64).uniform_(-f.max, f.max, generator=gen)
    x[:20_000] *= f.min_normal / f.max  # plenty in the subnormal range
    x = x.float()
    lo, hi = neighbours(x.double().numpy(), ml_type)
    tz = q(x, f, rounding="toward_zero").double().numpy()
    assert np.array_equal(tz, np.where(x.numpy() >= 0, lo, hi))
    sr = q(x, f, rounding="stochastic", generator=gen).double().numpy()
    assert np.all((sr == lo) | (sr == hi))
    assert (sr != tz).any()  # it does round away from zero sometimes


# (format, value): P(round up) is p = (x - lo) / (hi - lo); the values cover a normal binade,
# the subnormal range, a negative value and a tiny p.
SR_CASES = [("bf16", 1.0 + 0.3 * 2**-7), ("fp8_e4m3fn", 0.7 * 2**-9), ("fp8_e5m2", -3.3),
            ("fp4_e2m1fn", 2.5 + 0.125), ("fp16", 1000.0 + 0.03125)]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), SR_CASES)
def test_stochastic_rounding_is_unbiased(name, value):
    """n independent roundings of x: the count k of upper neighbours is Binomial(n, p).
    Hoeffding: P(|k/n - p| >= t) <= 2 exp(-2 n t^2); with t = sqrt(ln(2/delta) / (2n)) and
    delta = 1e-9 a correct implementation fails once in a billion runs, while a bias of
    t = 0.0033 (n = 2^20) -- e.g. rounding to nearest, which moves p to 0 or 1 -- fails."""
    f, n, delta = FORMATS[name], 2**20, 1e-9
    x = torch.full((n,), value, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    r = q(x, f, rounding="stochastic", generator=gen).double()
    lo, hi = (v.item() for v in neighbours(np.array([float(x[0])]), ML[name]))
    assert lo < float(x[0]) < hi
    assert ((r == lo) | (r == hi)).all()
    p = (float(x[0]) - lo) / (hi - lo)
    k = int((r == hi).sum())
    t = math.sqrt(math.log(2 / delta) / (2 * n))
    assert abs(k / n - p) <= t, (k / n, p, t)
    assert abs(r.mean().item() - float(x[0])) <= t * (hi - lo)  # the same bound on the mean


def test_stochastic_rounding_is_reproducible_with_a_generator():
    x = torch.randn(10_000)

    def run(seed):
        return q(x, "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    exact = q(x, "bf16")
    assert torch.equal(q(exact, "bf16", rounding="stochastic"), exact)  # representable: kept


# ---- hypothesis properties -------------------------------------------------------------------
PROPERTY_FORMATS = [*FORMAT_NAMES, "e3m4", "e2m5fn"]
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), xs=st.lists(finite32, min_size=1, max_size=64),
       rounding=st.sampled_from(["nearest", "toward_zero"]))  # fmt: skip
def test_quantize_is_idempotent_monotone_and_sign_symmetric(name, xs, rounding):
    f = get_format(name)
    x = torch.tensor(sorted(xs), dtype=torch.float32)
    if not f.signed:
        x = x.abs().sort().values
    if not f.has_zero:  # 0 is NaN there (no zero to round to)
        x = x[x != 0]
    y = q(x, f, rounding=rounding, overflow="saturate")
    assert same_bits(q(y, f, rounding=rounding, overflow="saturate"), y).all()  # idempotent
    assert (y[1:] >= y[:-1]).all()  # monotone (x sorted)
    if f.signed:
        assert torch.equal(q(-x, f, rounding=rounding, overflow="saturate"), -y)  # odd


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["bf16", "fp16", "tf32", "fp8_e4m3fn", "fp8_e5m2fnuz", "fp4_e2m1fn",
                              "fp6_e3m2fn", "e8m0fnu", "e3m4", "e11m20"]),
       xs=st.lists(st.floats(width=64, allow_nan=False), min_size=1, max_size=32))  # fmt: skip
def test_result_is_representable_and_nearest(name, xs):
    f = get_format(name)
    x = torch.tensor(xs, dtype=torch.float64)
    for tz in (False, True):
        got = q(x, f, rounding="toward_zero" if tz else "nearest")
        ref = torch.tensor([oracle_nearest(v, f, tz) for v in xs], dtype=torch.float64)
        assert same_bits(got, ref).all()
    # stochastic: the truncated value or the next one away from zero (the spacing further)
    sr = q(x, f, rounding="stochastic", generator=torch.Generator().manual_seed(len(xs)))
    for v, r in zip(xs, sr.tolist()):
        low = oracle_nearest(v, f, toward_zero=True)
        if math.isnan(low) or abs(v) >= f.max or low == v:
            continue
        e = max(math.frexp(abs(v))[1] - 1, f.min_exponent)
        high = math.copysign(abs(low) + math.ldexp(1.0, e - f.mantissa_bits), v)
        assert r in (low, high) or (abs(high) > f.max and not math.isfinite(r))


# ---- decode / explain ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp4_e2m1fn",
                                  "fp6_e2m3fn", "e8m0fnu"])  # fmt: skip
def test_decode_recovers_every_bit_pattern(name):
    f, ml_type = FORMATS[name], ML[name]
    pats = np.arange(2**f.bits, dtype=np.uint8)
    vals = pats.view(ml_type).astype(np.float64)
    for pat, v in zip(pats.tolist(), vals.tolist()):
        d = decode(v, f)
        if math.isnan(v):
            assert d.value_class == "nan" and math.isnan(d.value)
        else:
            assert d.bits == pat and d.value == v and int(d.bit_string.replace(" ", ""), 2) == pat


def test_decode_fp16_fields():
    d = decode(-(2.0**-24), "fp16")
    assert (d.sign, d.exponent_field, d.mantissa_field, d.value_class) == (1, 0, 1, "subnormal")
    assert d.bit_string == "1 00000 0000000001" and d.bits == 0x8001
    one = decode(1.0, "half")
    assert (one.bits, one.exponent, one.value_class) == (0x3C00, 0, "normal")
    pats = torch.arange(0, 2**15, 37, dtype=torch.int32).to(torch.int16)
    for pat, v in zip(pats.tolist(), pats.view(torch.float16).tolist()):
        if math.isfinite(v):
            assert decode(v, "fp16").bits == pat
    assert decode(math.inf, "fp16").value_class == "inf"


def test_explain_fp16_vs_bf16_at_0_001():
    fp16, bf16 = explain(0.001, ["fp16", "bf16"])
    assert fp16.nearest == float(np.float16(0.001))
    assert bf16.nearest == float(np.float32(0.001).astype(ml_dtypes.bfloat16))
    assert fp16.rel_error < bf16.rel_error  # bf16 does not keep 0.001 more precisely
    for r in (fp16, bf16):
        assert r.below < 0.001 < r.above and r.above - r.below == r.gap
        assert r.abs_error == abs(r.nearest - 0.001) and r.status == "rounded"


def test_explain_statuses():
    (r,) = explain(1e6, "fp8_e4m3fn")
    assert r.status == "overflow" and math.isnan(r.nearest) and r.below == 448.0
    assert explain(1e-10, "fp16")[0].status == "underflow"
    assert explain(1e-6, "fp16")[0].status == "subnormal"
    assert explain(1.0, "fp16")[0].status == "exact"
    assert explain(3.0, "e8m0fnu")[0].nearest == 4.0  # tie rounds up with no mantissa
    # the rounding boundary above max: 464 = 448 + 32/2 ties to even 448 in e4m3fn;
    # fp4 saturates, and 7 = 6 + 2/2 ties away from 6 (odd mantissa): an overflow
    assert [r.status for r in explain(464.0, ["e4m3", "fp4"])] == ["rounded", "overflow"]
    assert [r.status for r in explain(6.9, "fp4") + explain(7.0, "fp4")] == ["rounded", "overflow"]
    assert explain(math.inf, "fp16")[0].status == "exact"
    assert explain(math.inf, "e4m3")[0].status == "overflow"
    zero = explain(0.0, "e8m0fnu")[0]
    assert zero.status == "nan" and math.isnan(zero.below) and zero.above == 2.0**-127
    assert math.isnan(explain(math.nan, "fp16")[0].rel_error)


# ---- bad input -------------------------------------------------------------------------------
def test_unknown_format_lists_the_names():
    with pytest.raises(ValueError, match="unknown format 'fp7'.*fp8_e4m3fn.*e8m0fnu"):
        get_format("fp7")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.complex64, torch.bool,
                                   torch.float8_e4m3fn])  # fmt: skip
def test_quantize_rejects_non_float_tensors(dtype):
    with pytest.raises(TypeError, match="float64, float32, bfloat16 or float16"):
        q(torch.zeros(3, dtype=dtype), "bf16")


def test_shapes_layouts_and_autograd():
    assert q(torch.empty(0, 3), "fp4").shape == (0, 3)
    assert q(torch.tensor(3.3), "fp4").item() == 3.0  # 0-dim; the tie-free nearest of 3.3
    x = torch.randn(40, 70)
    assert torch.equal(q(x.t(), "e4m3"), q(x, "e4m3").t())  # non-contiguous input
    assert torch.equal(q(x[:, ::3], "e5m2"), q(x[:, ::3].contiguous(), "e5m2"))
    w = torch.randn(100, requires_grad=True)
    for name in ("bf16", "e4m3"):
        y = q(w, name)
        assert not y.requires_grad and torch.equal(y, q(w.detach(), name))


def test_quantize_rejects_non_tensors_and_bad_modes():
    with pytest.raises(TypeError, match="torch.Tensor"):
        q([1.0], "bf16")
    with pytest.raises(ValueError, match="rounding='up'"):
        q(torch.ones(1), "bf16", rounding="up")
    with pytest.raises(ValueError, match="overflow='wrap'"):
        q(torch.ones(1), "bf16", overflow="wrap")


@pytest.mark.parametrize(("args", "message"), [
    ((0, 3), "at least 1 exponent bit"),
    ((8, 30), "39 bits; custom formats have at most 32"),
    ((-1, 2), "at least 1 exponent bit"),
    ((3, -1), "mantissa_bits=-1"),
    ((1, 0), "needs >= 2 exponent bits and >= 1 mantissa bit"),
])  # fmt: skip
def test_impossible_custom_layouts(args, message):
    with pytest.raises(ValueError, match=message):
        FloatFormat.custom(*args)


def test_custom_names_and_layouts():
    f = get_format("e3m4")
    assert f == FloatFormat.custom(3, 4)
    assert f.max == float(ml_dtypes.finfo(ml_dtypes.float8_e3m4).max)
    assert FloatFormat.custom(2, 5, nan="none").max == 7.875
    with pytest.raises(ValueError, match="nan='fnuz'"):
        FloatFormat.custom(4, 3, nan="fnuz", signed=False)


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_table_lists_every_format(capsys):
    assert cli.main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in FORMAT_NAMES:
        assert name in out
    assert "65504" in out and "448" in out and "57344" in out


def test_cli_explain(capsys):
    assert cli.main(["formats", "explain", "0.001", "--format", "fp16", "--format", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "0.00100040436" in out and "0.000999450684" in out and "rounded" in out


def test_cli_errors(capsys):
    assert cli.main(["formats", "explain", "abc"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert cli.main(["formats", "explain", "1", "-f", "fp7"]) == 2
    assert "unknown format 'fp7'" in capsys.readouterr().err


def test_cli_plot_writes_pngs(tmp_path, capsys):
    import matplotlib.image

    assert cli.main(["formats", "plot", "--out", str(tmp_path), "-f", "fp8_e4m3fn",
                     "-f", "bf16"]) == 0  # fmt: skip
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["layout_bf16.png", "layout_fp8_e4m3fn.png", "rounding_error.png"]
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 50 and img.shape[1] > 100 and img.std() > 0  # not blank


@pytest.mark.parametrize("chunk", [7, 10**9])  # odd chunks; one chunk (the CUDA path)
def test_chunking_does_not_change_results(monkeypatch, chunk):
    import mixprec.formats.rounding as rounding

    x = torch.from_numpy(tricky_fp32(FORMATS["fp6_e2m3fn"], ML["fp6_e2m3fn"],
                                     np.random.default_rng(5), 5_000))  # fmt: skip
    cases = [("fp6_e2m3fn", "nearest"), ("e8m0fnu", "toward_zero"), ("e3m4", "nearest")]
    expected = [q(x, f, rounding=r) for f, r in cases]
    monkeypatch.setattr(rounding, "_CHUNK", chunk)
    for (f, r), want in zip(cases, expected):
        assert same_bits(q(x, f, rounding=r), want).all(), f


# ---- devices ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["bf16", "fp8_e4m3fn", "fp4_e2m1fn", "e8m0fnu"])
def test_cuda_matches_cpu(name):
    x = torch.from_numpy(tricky_fp32(get_format(name), ML[name], np.random.default_rng(4), 10_000))
    got = q(x.cuda(), name).cpu()
    assert same_bits(got, q(x, name)).all()
    sr = q(x.cuda(), name, rounding="stochastic", generator=torch.Generator("cuda").manual_seed(0))
    assert sr.is_cuda


# ---- docstring examples ------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["layout", "rounding", "explain", "report"])
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"mixprec.formats.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
