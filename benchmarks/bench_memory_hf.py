"""Estimate from config.json vs measured peak, for Hugging Face models built offline on a CPU.

Prints one row per (model, recipe): the estimate (``mixprec.memory.estimate`` of the
model's config dict, ``device="cpu"``), the measured peak (``mixprec.memory.measure``: the
CPU allocator's events through the profiler, no dispatch mode) and their ratio::

    ratio = estimate.total / measured.peak

Usage: PYTHONPATH=src python benchmarks/bench_memory_hf.py [--families gpt2,llama,bert]
       [--recipes fp32,bf16-mixed,fp16-mixed,bf16-master,bf16-true]
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers

from mixprec.memory import estimate, measure
from mixprec.memory.hf_models import FAMILIES, small_model, token_batch

B, S = 4, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--recipes", default="fp32,bf16-mixed,fp16-mixed,bf16-master,bf16-true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, batch {B} x seq {S}")  # fmt: skip
    print("| model | recipe | estimate MiB | measured MiB | ratio | peak phase |")
    print("|---|---|---:|---:|---:|---|")
    for family in args.families.split(","):
        for recipe in args.recipes.split(","):
            cfg, model = small_model(family)
            e = estimate(cfg.to_dict(), recipe, batch_size=B, seq_len=S, device="cpu")
            m = measure(model, torch.optim.AdamW(model.parameters()), recipe,
                        token_batch(cfg, B, S), steps=2)  # fmt: skip
            print(f"| {family} | {recipe} | {e.total / 2**20:.1f} | {m.peak / 2**20:.1f} | "
                  f"{e.total / m.peak:.3f} | {m.peak_phase} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
