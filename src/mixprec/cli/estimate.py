"""``mixprec estimate``: training memory per device for a model and recipe, before running.

Examples::

    mixprec estimate llama-2-7b --recipe bf16-mixed --seq 4096 --device h100-80gb
    mixprec estimate path/to/config.json --gpus 8 --zero 3 --json
    mixprec estimate --model mypkg.mymodel:factory   # your model; its first batch is traced
"""

from __future__ import annotations

import argparse

from mixprec.cli.checks import CliError, positive_int
from mixprec.cli.options import Command, names, recipe_names

__all__ = ["COMMAND"]


def _arguments(p: argparse.ArgumentParser) -> None:
    from mixprec.memory.devices import DEVICES
    from mixprec.memory.specs import PRESETS

    p.add_argument("model", nargs="?", help=f"a config.json path or a preset: {names(PRESETS)}")
    p.add_argument(
        "--model", dest="factory", metavar="PKG.MOD:FACTORY",
        help="your model, as for bench: factory() -> (model, optimizer_factory, batches, "
        "loss_fn); its first batch is traced for the activations",
    )  # fmt: skip
    p.add_argument(
        "--recipe", default="bf16-mixed", help=f"recipe (default bf16-mixed): {recipe_names()}"
    )
    p.add_argument("--optimizer", default="adamw", help="adamw, adam, sgd, sgd-momentum")
    p.add_argument(
        "--batch", type=positive_int, default=None, help="micro-batch per device (default 1)"
    )
    p.add_argument("--seq", type=positive_int, default=None, help="sequence length (default: max)")
    p.add_argument(
        "--gpus", type=positive_int, default=1, help="devices the states are sharded over"
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
        "--lora-rank", type=positive_int, default=None, help="train LoRA adapters of rank R"
    )
    p.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="modules LoRA adapts, comma-separated (default q_proj,v_proj)")  # fmt: skip
    p.add_argument(
        "--offload", choices=["none", "optimizer"], default="none",
        help="optimizer: master weights and optimizer states in host memory",
    )  # fmt: skip
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--device", help=f"known device: {names(DEVICES)}")
    dev.add_argument("--device-memory", help="device memory, e.g. 80GiB or 24GB")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _target(args: argparse.Namespace) -> tuple:
    """(model_or_spec, extra estimate() arguments) from the positional model or --model."""
    if (args.model is None) == (args.factory is None):
        raise CliError("give a preset or config.json path, or --model package.module:factory")
    if args.model is not None:
        return args.model, {}
    from mixprec.bench.user import load_user_task

    task = load_user_task(args.factory)
    model = task.build_model()
    (batch,) = task.train_batches(1)  # the first batch: the one that is traced
    optimizer = task.build_optimizer(model)
    return model, {"batch": tuple(batch), "loss_fn": task.loss, "optimizer": optimizer}


def _run(args: argparse.Namespace) -> int:
    import json

    from mixprec.memory import device_memory, estimate, parse_size
    from mixprec.memory.report import render, verdict

    try:
        target, extra = _target(args)
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
    except TypeError as exc:  # a bad argument value: one line without the "TypeError:" prefix
        raise CliError(str(exc)) from None
    if args.json:
        out = e.to_dict()
        if v is not None:
            out["verdict"] = v.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(render(e, v), end="")
    return 0


COMMAND = Command(
    "estimate", _arguments, _run, help="predict training memory for a model and recipe",
    description="Memory per device: weights, gradients, masters, optimizer states, copies, "
    "activations; and whether it fits a device.",
)  # fmt: skip
