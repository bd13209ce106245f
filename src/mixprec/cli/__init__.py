"""The `mixprec` command: formats, estimate, diagnose, bench.

Each subcommand parses its arguments here and calls the library; rendering lives beside
the data it renders (e.g. ``mixprec.bench.report``), so this module stays a thin shell.

Errors: an expected failure (a bad name or number, a path that cannot be read or written,
a device this machine does not have, a user factory that fails) is printed as one line on
stderr, ``mixprec COMMAND: error: ...`` naming the bad value and what is accepted, and the
exit status is 2. Ctrl-C prints one line and exits with 130. Anything else is a bug: one
line and exit status 1. ``--debug`` (or ``MIXPREC_DEBUG=1``) prints the traceback too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Sequence

from mixprec.bench.console import wide_console
from mixprec.cli.checks import (
    DEBUG_ENV,
    CliError,
    _add_debug,
    _names,
    _Parser,
    check_device,
    check_out_dir,
)
from mixprec.cli.checks import positive_int as _positive_int

__all__ = ["DEBUG_ENV", "CliError", "build_parser", "main"]

# Exceptions that mean "the input cannot be used": one line, exit status 2.
_EXPECTED = (ValueError, TypeError, LookupError, OSError, ImportError, RuntimeError)


def _add_formats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "formats",
        help="number formats: table, explain a value, plots",
        description="Without an action: a table of every format's layout and limits.",
    )
    p.add_argument("--format", "-f", dest="formats", action="append", metavar="F",
                   help=f"only these formats (repeatable): {_format_choices()}")  # fmt: skip
    _add_debug(p)
    p.set_defaults(func=_formats_table, command_name="formats")
    actions = p.add_subparsers(dest="formats_action", metavar="ACTION")
    e = actions.add_parser("explain", help="what one value becomes in each format")
    e.add_argument("value", help="a number: 0.001, 1e-8, inf, nan, 0x1p-14")
    e.add_argument("--format", "-f", dest="formats", action="append", metavar="F",
                   help="format to explain in (repeatable; default fp32, fp16, bf16, "
                   f"fp8_e4m3fn, fp8_e5m2): {_format_choices()}")  # fmt: skip
    _add_debug(e)
    e.set_defaults(func=_formats_explain)
    pl = actions.add_parser("plot", help="PNG bit layouts and a rounding-error chart")
    pl.add_argument("--out", required=True, help="directory to write the PNG files to")
    pl.add_argument("--format", "-f", dest="formats", action="append", metavar="F",
                    help="formats to draw (repeatable; default fp16 bf16 fp8 fp6 fp4): "
                    f"{_format_choices()}")  # fmt: skip
    _add_debug(pl)
    pl.set_defaults(func=_formats_plot)


def _format_choices() -> str:
    from mixprec.formats import FORMATS

    return _names(FORMATS) + ", an alias (half, e4m3, ...) or a layout such as e3m4"


def _format_list(names: list[str] | None, default: Sequence[str]) -> list:
    from mixprec.formats import get_format

    try:
        return [get_format(n) for n in (names or default)]
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _formats_table(args: argparse.Namespace) -> int:
    from mixprec.formats import FORMATS
    from mixprec.formats.report import format_table

    wide_console().print(format_table(_format_list(args.formats, list(FORMATS))))
    return 0


def _formats_explain(args: argparse.Namespace) -> int:
    from mixprec.formats.report import explain_table

    text = args.value.strip()
    try:
        value = float.fromhex(text) if "0x" in text.lower() else float(text)
    except (ValueError, OverflowError):
        raise CliError(
            f"value {args.value!r} is not a number (e.g. 0.001, 1e-8, 0x1p-14, inf, nan)"
        ) from None
    word = text.lower().lstrip("+-")
    if math.isinf(value) and word not in ("inf", "infinity"):
        print(
            f"note: {args.value} is beyond float64's largest value (1.8e308) and is read as "
            f"{value}",
            file=sys.stderr,
        )
    elif value == 0 and _nonzero_digits(text):
        print(
            f"note: {args.value} is below float64's smallest value (4.9e-324) and is read as "
            f"{value}",
            file=sys.stderr,
        )
    default = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
    fmts = _format_list(args.formats, default)
    wide_console().print(explain_table(value, fmts))
    if math.isnan(value):
        for f in fmts:
            if not f.has_nan:
                print(f"note: {f.name} has no NaN (every bit pattern is a number); a NaN "
                      "cannot be stored in it", file=sys.stderr)  # fmt: skip
    return 0


def _nonzero_digits(text: str) -> bool:
    """Whether the digits of a decimal or hex number (before its exponent) are not all 0."""
    low = text.lower()
    if "0x" in low:
        return any(c in "123456789abcdef" for c in low.split("0x", 1)[1].split("p")[0])
    return any(c in "123456789" for c in low.split("e")[0])


def _formats_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixprec.formats.report import DEFAULT_PLOT_FORMATS, plot_layouts, plot_rounding_error

    fmts = _format_list(args.formats, DEFAULT_PLOT_FORMATS)
    out = Path(check_out_dir(args.out))
    paths = plot_layouts(fmts, out)
    paths.append(plot_rounding_error(fmts, out / "rounding_error.png"))
    for path in paths:
        print(path)
    return 0


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict training memory for a model and recipe",
        description="Memory per device: weights, gradients, masters, optimizer states, "
        "copies, activations; and whether it fits a device.",
    )
    from mixprec.memory.devices import DEVICES
    from mixprec.memory.specs import PRESETS

    p.add_argument(
        "model", nargs="?", help=f"a config.json path or a preset: {_names(PRESETS)}"
    )
    p.add_argument(
        "--model", dest="factory", metavar="PKG.MOD:FACTORY",
        help="your model, as for bench: factory() -> (model, optimizer_factory, batches, "
        "loss_fn); its first batch is traced for the activations",
    )  # fmt: skip
    p.add_argument(
        "--recipe", default="bf16-mixed", help=f"recipe (default bf16-mixed): {_recipe_names()}"
    )
    p.add_argument("--optimizer", default="adamw", help="adamw, adam, sgd, sgd-momentum")
    p.add_argument(
        "--batch", type=_positive_int, default=None, help="micro-batch per device (default 1)"
    )
    p.add_argument("--seq", type=_positive_int, default=None, help="sequence length (default: max)")
    p.add_argument(
        "--gpus", type=_positive_int, default=1, help="devices the states are sharded over"
    )
    p.add_argument("--zero", default="0", choices=["0", "1", "2", "3", "fsdp"],
                   help="ZeRO stage (DeepSpeed), or fsdp (FSDP2 full shard)")  # fmt: skip
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument(
        "--attention",
        choices=["eager", "sdpa", "flash"],
        default="sdpa",
        help="sdpa (default: what HF and torch use on a GPU), flash (fused, keeps only "
        "log-sum-exp) or eager (keeps the attention scores)",
    )
    p.add_argument(
        "--implementation", choices=["hf", "megatron"], default="hf",
        help="whose activations: the Hugging Face code (default) or Megatron's fused kernels",
    )  # fmt: skip
    p.add_argument("--on", dest="runs_on", choices=["cuda", "cpu"], default="cuda",
                   help="where training runs (default cuda)")  # fmt: skip
    p.add_argument(
        "--lora-rank", type=_positive_int, default=None, help="train LoRA adapters of rank R"
    )
    p.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="modules LoRA adapts, comma-separated (default q_proj,v_proj)")  # fmt: skip
    p.add_argument(
        "--offload", choices=["none", "optimizer"], default="none",
        help="optimizer: master weights and optimizer states in host memory",
    )  # fmt: skip
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--device", help=f"known device: {_names(DEVICES)}")
    dev.add_argument("--device-memory", help="device memory, e.g. 80GiB or 24GB")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_debug(p)
    p.set_defaults(func=_run_estimate, command_name="estimate")


def _recipe_names() -> str:
    from mixprec.recipes import recipe_names

    return _names(recipe_names())


def _task_names() -> str:
    from mixprec.bench.tasks import SIZES, TASKS

    return _names(TASKS), " | ".join(SIZES)


def _estimate_target(args: argparse.Namespace) -> tuple:
    """(model_or_spec, extra estimate() arguments) from the positional model or --model."""
    if (args.model is None) == (args.factory is None):
        raise CliError("give a preset or config.json path, or --model package.module:factory")
    if args.model is not None:
        return args.model, {}
    from mixprec.bench.user import load_user_task

    task = load_user_task(args.factory)
    model = task.build_model()
    batch = task._take(1)[0]
    optimizer = task.build_optimizer(model)
    return model, {"batch": tuple(batch), "loss_fn": task._loss_fn, "optimizer": optimizer}


def _run_estimate(args: argparse.Namespace) -> int:
    import json

    from mixprec.memory import device_memory, estimate, parse_size
    from mixprec.memory.report import render, verdict

    try:
        target, extra = _estimate_target(args)
        zero = args.zero if args.zero == "fsdp" else int(args.zero)
        lora = None
        if args.lora_rank is not None:
            lora = (args.lora_rank, tuple(t for t in args.lora_targets.split(",") if t))
        kwargs = dict(
            optimizer=args.optimizer, batch_size=args.batch,
            seq_len=args.seq, activation_checkpointing=args.checkpointing,
            zero_stage=zero, world_size=args.gpus, attention=args.attention,
            implementation=args.implementation, device=args.runs_on, lora=lora,
            offload=args.offload,
        )  # fmt: skip
        kwargs.update(extra)
        e = estimate(target, args.recipe, **kwargs)
        capacity = None
        if args.device:
            capacity = device_memory(args.device)
        elif args.device_memory:
            capacity = parse_size(args.device_memory)
        kept = {k: kwargs[k] for k in ("lora", "offload", "batch", "loss_fn") if k in kwargs}
        v = verdict(target, e, capacity, **kept) if capacity is not None else None
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        out = e.to_dict()
        if v is not None:
            out["verdict"] = v.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(render(e, v), end="")
    return 0


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    from mixprec.numerics.monitor import DEFAULT_FORMATS

    p = sub.add_parser(
        "diagnose",
        help="train with the numerics monitor and report",
        description="Train a task (or a user model) with a recipe under the numerics monitor; "
        "print the per-layer table and write numerics.json, table.txt and PNG plots.",
    )
    tasks, sizes = _task_names()
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="gpt", help=f"built-in task (default gpt): {tasks}")
    src.add_argument(
        "--model",
        metavar="PACKAGE.MODULE:FACTORY",
        help="your model instead of a task (protocol: mixprec.bench.user)",
    )
    p.add_argument("--size", default="small", help=f"task size (default small): {sizes}")
    p.add_argument(
        "--recipe", default="fp16-mixed", help=f"recipe (default fp16-mixed): {_recipe_names()}"
    )
    p.add_argument("--steps", type=_positive_int, default=50, help="training steps (default 50)")
    p.add_argument(
        "--every", type=_positive_int, default=1, help="measure one step in N (default 1)"
    )
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        help=f"target format (repeatable; default {', '.join(DEFAULT_FORMATS)}): "
        + _format_choices(),
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and data order (default 0)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on (default cpu): cpu, cuda, cuda:N, mps",
    )
    p.add_argument(
        "--out", default="diagnose-report", help="output folder (default diagnose-report)"
    )
    _add_debug(p)
    p.set_defaults(func=_diagnose, command_name="diagnose")


def _diagnose(args: argparse.Namespace) -> int:
    from mixprec.bench.diagnose import diagnose
    from mixprec.numerics.monitor import DEFAULT_FORMATS

    check_device(args.device)
    check_out_dir(args.out)
    try:
        diagnose(
            args.model or args.task,
            recipe=args.recipe,
            steps=args.steps,
            out=args.out,
            size=args.size,
            formats=args.formats or DEFAULT_FORMATS,
            every=args.every,
            seed=args.seed,
            device=args.device,
            console=wide_console(),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from mixprec.cli.bench import add_arguments

    p = sub.add_parser(
        "bench",
        help="run recipes side by side, recommend one, write a report",
        description="Train a task (or your model) with several recipes from the same weights "
        "on the same batches; compare speed, memory and quality; recommend one; write "
        "OUT/report.md, OUT/results.json and PNG plots.",
    )
    add_arguments(p)
    _add_debug(p)
    p.set_defaults(func=_bench, command_name="bench")


def _bench(args: argparse.Namespace) -> int:
    from mixprec.cli.bench import run

    check_device(args.device)
    check_out_dir(args.out)
    try:
        return run(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mixprec",
        description="Mixed-precision training for PyTorch: formats, memory, numerics, bench.",
    )
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_formats, _add_estimate, _add_diagnose, _add_bench):
        add(sub)
    return parser


def _debug_requested(args: argparse.Namespace) -> bool:
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(getattr(args, "debug", False)) or env in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, ValueError)):
        return text
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename!r}"
    return f"{type(exc).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 Ctrl-C, 1 bug)."""
    parser = build_parser()
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error, already printed (2)
            return exc.code if isinstance(exc.code, int) else 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        name = f"mixprec {args.command}" if args is not None else "mixprec"
        if args is not None and _debug_requested(args):
            traceback.print_exc()
        print(f"{name}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mixprec bench --list | head`: the reader has gone, quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as a shell reports it
    except (CliError, *_EXPECTED) as exc:
        if _debug_requested(args):
            traceback.print_exc()
        print(f"mixprec {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _debug_requested(args):
            traceback.print_exc()
        print(
            f"mixprec {args.command}: internal error: {_one_line(exc)} (run with --debug or "
            f"{DEBUG_ENV}=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
