"""Train the gpt task data-parallel under any recipe, with DDP or FSDP2, launched by torchrun.

The same script runs on CPUs (gloo) and GPUs (nccl, one GPU per process), on one machine
or many::

    # one machine, two processes (CPU: gloo over loopback; GPU: one GPU each)
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --recipe bf16-mixed
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py \\
        --strategy fsdp2 --recipe bf16-master --grad-comm bf16
    # fp8 Linear layers under FSDP2, weights all-gathered in fp8; print bytes per step
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py \\
        --strategy fsdp2 --recipe fp8-mixed --fp8-all-gather --count-bytes
    # two machines, 8 GPUs each (run the same line on both)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-id demo --rdzv-backend c10d \\
        --rdzv-endpoint node0.example.com:29500 examples/train_distributed.py --size base

Run without torchrun it trains in one process (a one-rank process group). Each rank takes
every ``world``-th batch of the task's stream, so N ranks see N times the data per step.
``--checkpoint DIR`` writes per-rank checkpoints at the end; ``--resume`` continues from
them bit-exactly on the same number of ranks.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import mixprec as mp
import mixprec.distributed as mpd
from mixprec.bench.tasks import get_task

COMM = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="bf16-mixed", help="recipe name (default bf16-mixed)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--size", choices=("tiny", "small", "base"), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: the task's")
    parser.add_argument(
        "--grad-comm", choices=tuple(COMM), default=None, help="gradient communication dtype"
    )
    parser.add_argument(
        "--fp8-all-gather", action="store_true", help="FSDP2: all-gather fp8 weights in fp8"
    )
    parser.add_argument(
        "--count-bytes", action="store_true", help="FSDP2: print all-gather bytes per step"
    )
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint", default=None, help="directory for per-rank checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint DIR")
    if (args.fp8_all_gather or args.count_bytes) and args.strategy != "fsdp2":
        parser.error("--fp8-all-gather and --count-bytes need --strategy fsdp2")
    return args


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or make a one-rank group); pick this rank's device."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "RANK" in os.environ:  # launched by torchrun: it sets RANK, WORLD_SIZE, MASTER_*
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def main() -> None:
    args = parse_args()
    rank, world, device = init_distributed()
    task = get_task("gpt", args.size, seed=0)
    steps = args.steps if args.steps is not None else task.default_steps
    comm = COMM[args.grad_comm] if args.grad_comm else None

    model = task.build_model().to(device)  # same weights on every rank (same seed)
    if args.strategy == "ddp":
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    else:
        model = mpd.shard_model(
            model, args.recipe, grad_comm_dtype=comm, fp8_all_gather=args.fp8_all_gather
        )
    counts = mpd.count_fsdp_bytes(model) if args.count_bytes else None
    precision = mp.Precision(args.recipe, grad_comm_dtype=comm)
    model, opt = precision.setup(model, task.build_optimizer(model))

    start = 0
    if args.resume:
        extra = mpd.load_checkpoint(
            args.checkpoint, model=model, optimizer=opt, precision=precision
        )
        start = extra["step"]
    if rank == 0:
        print(
            f"gpt/{args.size}: {args.strategy} on {world} rank(s), {device.type}, "
            f"recipe {precision.recipe}, steps {start}..{steps}"
        )

    # rank r takes batches r, r + world, r + 2 world, ... of the task's stream
    batches = itertools.islice(task.train_batches(steps * world), start * world + rank, None, world)
    skipped = torch.zeros((), device=device)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches, start=start + 1):
        x, y = x.to(device), y.to(device)
        with precision.autocast():
            loss = task.loss(model(x), y)
        precision.backward(loss)
        result = precision.step(opt, max_grad_norm=args.max_grad_norm)
        if result.found_inf is not None:
            skipped += result.found_inf  # stays on the device: no sync per step
        if step % args.log_every == 0 or step == steps:
            mean = loss.detach().float()
            dist.all_reduce(mean)
            if rank == 0:
                scale = precision.scaler.get_scale()
                print(
                    f"step {step:5d}  loss {mean.item() / world:.4f}  scale {scale:g}  "
                    f"skipped {int(skipped.item())}  {time.perf_counter() - t0:.1f}s"
                )

    if counts is not None and rank == 0:  # this rank's collectives, per training step
        n = steps - start
        print(
            f"bytes/step on rank 0: all-gather {counts.all_gather / n:.0f} "
            f"({counts.all_gather_calls / n:g} calls), reduce-scatter "
            f"{counts.reduce_scatter / n:.0f} ({counts.reduce_scatter_calls / n:g} calls)"
        )
    with precision.autocast(), torch.no_grad():
        metrics = task.evaluate(model)  # every rank runs it: FSDP2 all-gathers in forward
    if rank == 0:
        print(f"{task.metric}: {metrics[task.metric]:.4f}")
    if args.checkpoint:
        path = mpd.save_checkpoint(
            args.checkpoint, model=model, optimizer=opt, precision=precision, extra={"step": steps}
        )
        if rank == 0:
            print(f"checkpoint: {path.parent} ({world} file(s))")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
