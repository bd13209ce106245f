"""API calls that used to raise an unrelated exception (issue 14) and the helpers behind
the command line's guarantees: closest names, whole-folder reports, the user's sys.path."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from mixprec.formats import FloatFormat, decode, explain, get_format, quantize
from mixprec.formats.names import closest, unknown


@pytest.mark.parametrize(
    "kind, wrong, choices, first",
    [
        ("format", "fp8_e4m3", ["fp16", "fp8_e4m3fn", "fp8_e5m2"], "fp8_e4m3fn"),
        ("model", "gpt-2", ["gpt2", "gpt2-xl", "llama-2-7b"], "gpt2"),
        ("recipe", "bf16mixed", ["fp32", "fp16-mixed", "bf16-mixed"], "bf16-mixed"),
        ("recipe", "BF16_Mixed", ["fp32", "fp16-mixed", "bf16-mixed"], "bf16-mixed"),
        ("device", "h100", ["a100-40gb", "h100-80gb", "h200"], "h100-80gb"),
        ("task", "mpl", ["mlp", "unet", "gpt", "bert"], "mlp"),
    ],
)
def test_closest_names(kind, wrong, choices, first):
    assert closest(wrong, choices)[0] == first
    message = unknown(kind, wrong, choices)
    assert message.startswith(f"unknown {kind} {wrong!r}; did you mean {first!r}")
    assert message.endswith(", ".join(choices))


def test_no_suggestion_when_nothing_is_close():
    assert closest("zzzz", ["fp16", "bf16"]) == []
    assert unknown("format", "zzzz", ["fp16", "bf16"]) == (
        "unknown format 'zzzz'; choose one of fp16, bf16"
    )


def test_registries_suggest():
    from mixprec.bench.tasks import get_task
    from mixprec.memory import device_memory
    from mixprec.memory.specs import get_spec
    from mixprec.recipes import get_recipe

    for call, near in [
        (lambda: get_format("fp8_e4m3"), "'fp8_e4m3fn'"),
        (lambda: get_recipe("bf16mixed"), "'bf16-mixed'"),
        (lambda: get_spec("gpt-2"), "'gpt2'"),
        (lambda: device_memory("a100"), "'a100-40gb'"),
        (lambda: get_task("bertt"), "'bert'"),
    ]:
        with pytest.raises(ValueError, match=f"did you mean {near}"):
            call()


def test_custom_format_errors_name_the_value():
    with pytest.raises(ValueError, match=r"nan='maybe': choose one of \('ieee', 'fn'"):
        FloatFormat.custom(4, 3, nan="maybe")
    with pytest.raises(ValueError, match="bias=1.5: must be an integer"):
        FloatFormat.custom(4, 3, bias=1.5)
    with pytest.raises(ValueError, match=r"bias=1000000 .* between -1023 and 1036"):
        FloatFormat.custom(4, 3, bias=10**6)
    with pytest.raises(ValueError, match=r"bias=-1000000 .* between -1023 and 1036"):
        FloatFormat.custom(4, 3, bias=-(10**6))
    with pytest.raises(TypeError, match="format must be a name, a FloatFormat or a torch dtype"):
        get_format(3.0)


@pytest.mark.parametrize(
    "e, m, nan", [(4, 3, "fn"), (5, 2, "ieee"), (2, 1, "none"), (11, 3, "ieee")]
)
def test_every_accepted_bias_quantizes(e, m, nan):
    """Both ends of the accepted bias range quantize and explain; one past them is refused."""
    x = torch.tensor([1.0, 1e-30, 3e38, 1e-300, 5e-324, 1.7e308], dtype=torch.float64)
    low, high = FloatFormat.custom(e, m, nan=nan)._bias_limits()
    for bias in (low, high):
        f = FloatFormat.custom(e, m, nan=nan, bias=bias)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            q = quantize(x.to(dtype), f, overflow="saturate")
            assert q.dtype == dtype and not torch.isnan(q).any(), (bias, dtype, q)
        assert explain(1.0, f)[0].format == f.name
    for bias in (low - 1, high + 1):
        with pytest.raises(ValueError, match=f"bias={bias} puts"):
            FloatFormat.custom(e, m, nan=nan, bias=bias)


def test_explain_beyond_float64_and_nan_without_nan():
    row = explain(1.0, "e12m3")[0]  # the top binade is past float64: used to overflow
    assert (row.nearest, row.status) == (1.0, "exact")
    d = decode(math.nan, "fp4_e2m1fn")
    assert d.bits is None and d.bit_string == "no NaN in fp4_e2m1fn"
    assert decode(math.nan, "fp16").bits == 0x7E00  # formats with NaN keep their pattern


def test_monitor_needs_a_module():
    from mixprec.numerics import Monitor

    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str 'model'"):
        Monitor("model")


def test_replace_folder_swaps_whole_or_not_at_all(tmp_path):
    from mixprec.bench.output import replace_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), replace_folder(out) as tmp:
        (tmp / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with replace_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"), replace_folder(tmp_path / "file/o"):
        pass


def test_user_module_import_does_not_let_the_cwd_shadow_packages(tmp_path, monkeypatch):
    from mixprec.bench.user import load_user_task

    (tmp_path / "colorsys.py").write_text("raise RuntimeError('planted module ran')\n")
    (tmp_path / "h14_shadow_user.py").write_text(
        "import colorsys, functools, torch\n"
        "from torch import nn\n"
        "assert hasattr(colorsys, 'rgb_to_hsv')\n"
        "def factory():\n"
        "    batches = [(torch.randn(4, 2), torch.randn(4, 1))]\n"
        "    return (nn.Linear(2, 1), functools.partial(torch.optim.SGD, lr=0.1), batches,\n"
        "            nn.functional.mse_loss)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.delitem(sys.modules, "h14_shadow_user", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    task = load_user_task("h14_shadow_user:factory")
    assert isinstance(task.build_model(), nn.Linear)
    assert sys.path == before  # the cwd is gone again: later imports cannot pick it up
    assert str(tmp_path) not in sys.path


# -- the CPU kernel cache: no other user can place code that mixprec runs ---------------------
needs_cc = pytest.mark.skipif(
    __import__("shutil").which("cc") is None and __import__("shutil").which("gcc") is None,
    reason="no C compiler",
)
_C = "int mp_answer(void) { return 42; }\n"


def _cache_under(tmp_path, monkeypatch, parent_mode: int, owner: int | None = None):
    import os

    from mixprec.numerics.kernel_cache import private_folder

    shared = tmp_path / "shared"
    shared.mkdir(parents=True)
    os.chmod(shared, parent_mode)
    if owner is not None:
        os.chown(shared, owner, owner)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared / "cache"))
    return private_folder()


def test_cache_accepts_a_private_path(tmp_path, monkeypatch):
    folder = _cache_under(tmp_path, monkeypatch, 0o755)
    assert folder is not None and folder.name == "kernels"
    assert _cache_under(tmp_path / "x", monkeypatch, 0o1777) is not None  # sticky, like /tmp


def test_cache_refuses_a_world_writable_folder_on_the_way(tmp_path, monkeypatch):
    # the kernels folder itself is private; a parent anyone can write lets them swap it
    assert _cache_under(tmp_path, monkeypatch, 0o777) is None


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid") or __import__("os").getuid() != 0,
                    reason="needs root to give a folder to another user")  # fmt: skip
def test_cache_refuses_a_folder_of_another_user_on_the_way(tmp_path, monkeypatch):
    assert _cache_under(tmp_path, monkeypatch, 0o755, owner=54321) is None


def test_cache_resolves_links_before_checking(tmp_path, monkeypatch):
    import os

    from mixprec.numerics.kernel_cache import private_folder

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "cache").symlink_to(open_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / "cache"))
    assert private_folder() is None


@needs_cc
def test_library_is_built_privately_and_checked_when_opened(tmp_path):
    import ctypes
    import os
    import shutil

    from mixprec.numerics.kernel_cache import compile_cached, load_private

    cc = shutil.which("cc") or shutil.which("gcc")
    path = compile_cached(_C, _C + cc, "answer", cc, tmp_path, ["-O1"])
    assert path is not None and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert os.stat(path).st_mode & 0o777 == 0o700
    lib = load_private(path)
    lib.mp_answer.restype = ctypes.c_int
    assert lib.mp_answer() == 42
    link = tmp_path / "link.so"
    link.symlink_to(path)
    with pytest.raises(OSError):  # a link is not followed
        load_private(link)
    os.chmod(path, 0o722)  # writable by others: someone may have replaced the code
    with pytest.raises(PermissionError, match="not loaded"):
        load_private(path)
    os.chmod(path, 0o700)
    os.chmod(tmp_path, 0o777)  # a folder others can write: they could swap the file
    with pytest.raises(PermissionError, match="writable by other users"):
        load_private(path)
    os.chmod(tmp_path, 0o700)
    if os.getuid() == 0:
        os.chown(path, 54321, 54321)
        with pytest.raises(PermissionError, match="owner uid 54321"):
            load_private(path)
