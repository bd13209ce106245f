"""The command line under bad input, interruption and hostile text (issue 14).

Every expected failure is one line on stderr that names the bad value and what is
accepted, with exit status 2; Ctrl-C is one line and 130; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixprec.cli import DEBUG_ENV, build_parser, main
from tests.conftest import RECIPE_NAMES

_COUNTER = itertools.count()


def _user_module(tmp_path, monkeypatch, body: str) -> str:
    """Write ``body`` as a fresh module in tmp_path (the cwd) and return ``module:factory``."""
    name = f"h14_user_model_{next(_COUNTER)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:factory"


_EXAMPLE = """
    import functools, torch
    from torch import nn

    def factory():
        g = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))] * 2
        return model, functools.partial(torch.optim.SGD, lr=0.1), batches, LOSS
"""


@pytest.fixture
def afile(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
BAD_INPUT = [
    # (argv, what stderr names)
    (["formats", "-f", "fp8_e4m3"], "did you mean 'fp8_e4m3fn'"),
    (["formats", "explain", "1", "-f", "fp8_e4m3"], "did you mean 'fp8_e4m3fn'"),
    (["formats", "explain", "one"], "value 'one' is not a number"),
    (["estimate", "gpt-2"], "did you mean 'gpt2'?"),
    (["estimate", "gpt2", "--device", "h100"], "did you mean 'h100-80gb'"),
    (["estimate", "gpt2", "--recipe", "bf16mixed"], "did you mean 'bf16-mixed'?"),
    (["estimate", "gpt2", "--batch", "0"], "argument --batch: 0 must be at least 1"),
    (["bench", "--recipes", "bf16mixed"], "did you mean 'bf16-mixed'?"),
    (["bench", "--task", "mpl"], "did you mean 'mlp'?"),
    (["bench", "--size", "smal"], "did you mean 'small'?"),
    (["bench", "--steps", "x"], "argument --steps: 'x' is not an integer"),
    (["bench", "--steps", "100000000"], "--steps 100,000,000 is more than a bench can hold"),
    (["diagnose", "--steps", "100000000"], "--steps 100,000,000 is more than a diagnose run"),
    (["bench", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["bench", "--device", "cdua"], "did you mean 'cuda'"),
    (["diagnose", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["diagnose", "--recipe", "fp16mixed"], "did you mean 'fp16-mixed'?"),
    (["diagnose", "--every", "0"], "argument --every: 0 must be at least 1"),
    pytest.param(["bench", "--device", "cuda"], "CUDA is not available", marks=_NO_CUDA),
    pytest.param(["diagnose", "--device", "cuda:0"], "CUDA is not available", marks=_NO_CUDA),
    (["bench", "--out", "{afile}"], "--out '{afile}' is a file"),
    (["bench", "--out", "{afile}/sub"], "lies under '{afile}', which is a file"),
    (["diagnose", "--out", "{afile}/sub"], "lies under '{afile}', which is a file"),
    (["formats", "plot", "--out", "{afile}"], "--out '{afile}' is a file"),
    (["bench", "--model", "no_such_module_h14:factory"], "cannot import module"),
    (["bench", "--model", "mixprec.bench.user:PROTOCOL"], "is a str, not callable"),
]


@pytest.mark.parametrize("argv, names", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(argv, names, afile, capsys):
    argv = [a.format(afile=afile) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert names.format(afile=afile) in err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "body, names",
    [
        ("def factory():\n    raise RuntimeError('no data here')\n", "no data here"),
        ("def factory():\n    return 3\n", "returned int"),
        ("def factory():\n    return 1, 2, 3, 4\n", "model is a int"),
    ],
)
def test_a_user_factory_that_fails_is_one_line(body, names, tmp_path, monkeypatch, capsys):
    spec = _user_module(tmp_path, monkeypatch, body)
    for command in ("bench", "diagnose"):
        assert main([command, "--model", spec, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert names in err and spec in err and err.count("\n") == 1, err


def test_debug_flag_and_environment_show_the_traceback(monkeypatch, capsys):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert main(["bench", "--device", "bogus"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["bench", "--device", "bogus", "--debug"], ["--debug", "bench", "--device", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "is not a device" in err.splitlines()[-1]
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(["formats", "-f", "fp7"]) == 2
    assert "Traceback" in capsys.readouterr().err


def _options(parser: argparse.ArgumentParser, path: str = "mixprec"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help_and_name_options_list_the_names():
    from mixprec.bench.tasks import TASKS
    from mixprec.formats import FORMATS
    from mixprec.memory.devices import DEVICES

    options = list(_options(build_parser()))
    assert len(options) > 30
    for path, action in options:
        assert action.help, f"{path} {action.option_strings or action.dest} has no help"
    recipes = RECIPE_NAMES
    names = {"--recipe": recipes, "--recipes": recipes, "--task": TASKS, "--format": FORMATS}
    for path, action in options:
        for opt in action.option_strings:
            if opt in names:
                missing = [n for n in names[opt] if n not in action.help]
                assert not missing, f"{path} {opt} help misses {missing}"
        if path == "mixprec estimate" and "--device" in action.option_strings:
            assert all(d in action.help for d in DEVICES)


def test_explain_edge_values_are_said(capsys):
    assert main(["formats", "explain", "1", "-f", "e12m3"]) == 0  # was an OverflowError
    assert "e12m3" in capsys.readouterr().out
    assert main(["formats", "explain", "nan", "-f", "fp4_e2m1fn", "-f", "fp16"]) == 0
    out, err = capsys.readouterr()
    assert "no NaN in fp4_e2m1fn" in out and "0 11 1" not in out  # not the bits of +6
    assert "fp4_e2m1fn has no NaN" in err
    assert main(["formats", "explain", "1e400", "-f", "fp16"]) == 0
    assert "1e400 is beyond float64's largest value" in capsys.readouterr().err
    assert main(["formats", "explain", "1e-400", "-f", "fp16"]) == 0
    assert "1e-400 is below float64's smallest value" in capsys.readouterr().err
    assert main(["formats", "explain", "inf", "-f", "fp16"]) == 0
    assert "note" not in capsys.readouterr().err  # inf written as inf is not a surprise


_HOSTILE = """
    import functools, torch
    from torch import nn

    def factory():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        model.add_module("odd[/]name[bold]", nn.Identity())
        batches = [(torch.randn(8, 4), torch.randn(8, 1))] * 2
        return model, functools.partial(torch.optim.SGD, lr=0.1), batches, LOSS
"""


def test_user_text_is_printed_literally(tmp_path, monkeypatch, capsys):
    body = _HOSTILE.replace("LOSS", "torch.nn.functional.mse_loss")
    spec = _user_module(tmp_path, monkeypatch, body)
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", spec, "--steps", "2", "--out", str(out)]) == 0
    assert "odd[/]name[bold]" in capsys.readouterr().out
    assert "odd[/]name[bold]" in (out / "table.txt").read_text()


def test_failing_recipes_print_their_error_literally_and_recommend_nothing(
    tmp_path, monkeypatch, capsys
):
    loss = "lambda out, y: (_ for _ in ()).throw(RuntimeError('boom [/] :smile: [red]'))"
    spec = _user_module(tmp_path, monkeypatch, _EXAMPLE.replace("LOSS", loss))
    out = tmp_path / "rep"
    argv = ["bench", "--model", spec, "--recipes", "bf16-mixed", "--memory-steps", "0"]
    assert main([*argv, "--out", str(out)]) == 1  # the reference failed: not a success
    stdout = " ".join(capsys.readouterr().out.split())
    assert "boom [/] :smile: [red]" in stdout  # no MarkupError, no emoji
    assert "No recommendation: every recipe failed" in stdout
    assert "Recommended:" not in stdout
    assert (out / "results.json").exists()  # the report of the failures is still written


def test_ctrl_c_before_the_first_recipe_is_one_line(tmp_path, monkeypatch, capsys):
    spec = _user_module(tmp_path, monkeypatch, "def factory():\n    raise KeyboardInterrupt\n")
    for command in ("bench", "diagnose"):
        assert main([command, "--model", spec, "--out", str(tmp_path / "o")]) == 130
        err = capsys.readouterr().err
        assert "interrupted (Ctrl-C)" in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "o").exists()


def test_ctrl_c_while_writing_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    import mixprec.bench.plots as plots

    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("previous report")

    def interrupted_plots(result, folder, missing):  # Ctrl-C with a half-written PNG on disk
        (folder / "loss_curves.png").write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "write_plots", interrupted_plots)
    argv = ["bench", "--task", "mlp", "--size", "tiny", "--recipes", "fp32", "--steps", "2"]
    assert main([*argv, "--memory-steps", "0", "--out", str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert (out / "report.md").read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left


def test_a_new_report_replaces_the_previous_one_whole(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "stale_plot.png").write_bytes(b"old")
    argv = ["bench", "--task", "mlp", "--size", "tiny", "--recipes", "fp32", "--steps", "2"]
    assert main([*argv, "--memory-steps", "0", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "stale_plot.png" not in names and {"report.md", "results.json"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_batches_are_produced_as_consumed():
    import tracemalloc

    from mixprec.bench.tasks import Batches, get_task

    task = get_task("mlp", "tiny")
    task.example_batch()  # loads the data set (cached) before memory is counted
    tracemalloc.start()
    batches = Batches(task, 100_000_000)  # used to build every batch up front
    first = [x for x, _ in itertools.islice(iter(batches), 3)]
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(batches) == 100_000_000 and size < 2**20  # 3 batches, not 10^8
    again = [x for x, _ in batches[:3]]  # a second pass: the same batches
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(batches[1][0], first[1])


def test_user_batches_are_read_as_consumed_and_replayed(tmp_path, monkeypatch):
    from mixprec.bench.tasks import Batches, get_task

    body = """
        import functools, itertools, torch
        from torch import nn
        READ = []

        def stream():  # endless: the bench must not read it all before training
            for i in itertools.count():
                READ.append(i)
                yield torch.full((2, 2), float(i)), torch.zeros(2, 1)

        def factory():
            return (nn.Linear(2, 1), functools.partial(torch.optim.SGD, lr=0.1), stream(),
                    nn.functional.mse_loss)
    """
    spec = _user_module(tmp_path, monkeypatch, body)
    task = get_task(spec)
    module = sys.modules[spec.split(":")[0]]
    batches = Batches(task, 10**9)
    values = [float(x[0, 0]) for x, _ in itertools.islice(iter(batches), 5)]
    assert values == [0, 1, 2, 3, 4] and len(module.READ) <= 6
    assert [float(x[0, 0]) for x, _ in batches[:5]] == values  # the next recipe: same data


def test_a_run_that_cannot_finish_soon_is_warned_about():
    import io
    import time

    from rich.console import Console

    from mixprec.cli.bench import _warn_long_runs

    console = Console(file=io.StringIO(), width=200)
    seen = []
    on_event = _warn_long_runs(lambda kind, info: seen.append(kind), 10**8, 5, console)
    for step in range(1, 8):
        time.sleep(0.002)
        on_event("step", {"recipe": "fp32", "step": step, "loss": 1.0})
    text = console.file.getvalue()
    assert len(seen) == 7 and "100,000,000 steps x 5 recipes take about" in text
    assert "days" in text and "--steps" in text
    quiet = Console(file=io.StringIO())
    on_event = _warn_long_runs(lambda kind, info: None, 10, 1, quiet)
    for step in range(1, 8):
        on_event("step", {"recipe": "fp32", "step": step, "loss": 1.0})
    assert quiet.file.getvalue() == ""


def test_estimate_prints_names_literally(tmp_path, monkeypatch, capsys):
    # a config path with [brackets] and :name: was read as rich markup: "[bold]" vanished
    monkeypatch.chdir(tmp_path)  # a short relative path: the title line does not wrap
    folder = Path("odd[bold]x:smile:")
    folder.mkdir()
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2,
              "vocab_size": 100, "n_positions": 64}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["estimate", str(folder / "config.json"), "--device-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "odd[bold]x:smile:" in out
    assert "fits:" in out


def test_the_command_prints_no_profiler_log_lines(tmp_path):
    """torch's profiler logs two USDT lines per use; the command silences kineto's log
    unless the user set KINETO_LOG_LEVEL (kept as set) or asked for --debug."""
    import os
    import subprocess
    import sys

    code = "import sys; from mixprec.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["bench", "--task", "mlp", "--size", "tiny", "--recipes", "fp32", "--steps", "2",
            "--memory-steps", "1", "--out", str(tmp_path / "r")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("KINETO_LOG_LEVEL", "MIXPREC_DEBUG")}

    def output(**extra) -> str:
        run = subprocess.run([sys.executable, "-c", code, *argv], env={**env, **extra},
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout + run.stderr

    if "USDT" not in output(KINETO_LOG_LEVEL="3"):  # the user's own setting is kept
        pytest.skip("this torch's profiler logs no USDT lines")
    assert "USDT" not in output()
