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

B, S = 4, 128


def build(family: str):
    """(config, model) of a 4-layer, 256-wide model of the family, randomly initialised."""
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4)
        return cfg, transformers.GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=688,
        )  # fmt: skip
        return cfg, transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(
        num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
        architectures=["BertForMaskedLM"],
    )  # fmt: skip
    return cfg, transformers.BertForMaskedLM(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="gpt2,llama,bert")
    parser.add_argument("--recipes", default="fp32,bf16-mixed,fp16-mixed,bf16-master,bf16-true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, batch {B} x seq {S}")  # fmt: skip
    print("| model | recipe | estimate MiB | measured MiB | ratio | peak phase |")
    print("|---|---|---:|---:|---:|---|")
    for family in args.families.split(","):
        for recipe in args.recipes.split(","):
            cfg, model = build(family)
            x = torch.randint(cfg.vocab_size, (B, S))
            e = estimate(cfg.to_dict(), recipe, batch_size=B, seq_len=S, device="cpu")
            m = measure(model, torch.optim.AdamW(model.parameters()), recipe,
                        ({"input_ids": x, "labels": x}, None), steps=2)  # fmt: skip
            print(f"| {family} | {recipe} | {e.total / 2**20:.1f} | {m.peak / 2**20:.1f} | "
                  f"{e.total / m.peak:.3f} | {m.peak_phase} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
