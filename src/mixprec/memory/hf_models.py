"""Small Hugging Face models built from a config, offline: the planner checked on real code.

:func:`small_model` builds a 4-layer, 256-wide model of a family with random weights (no
download) and :func:`token_batch` a batch of random tokens for it, so that
``estimate(config.to_dict(), ...)`` can be compared with ``measure(model, ...)`` on this
machine (``benchmarks/bench_memory_hf.py`` prints that comparison; ``tests/test_memory_hf.py``
asserts it). ``transformers`` is imported when a function here is called, never by
``import mixprec``.

=========  ======================  ===========================================  ======
family     model                   layers x width, heads, MLP                   vocab
=========  ======================  ===========================================  ======
gpt2       ``GPT2LMHeadModel``     4 x 256, 4 heads, MLP 1024                   50257
llama      ``LlamaForCausalLM``    4 x 256, 4 heads (2 key/value), MLP 688      32000
bert       ``BertForMaskedLM``     4 x 256, 4 heads, MLP 1024                   30522
=========  ======================  ===========================================  ======
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "small_model", "token_batch"]

FAMILIES = ("gpt2", "llama", "bert")


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "mixprec.memory.hf_models builds Hugging Face models: pip install transformers"
        ) from err
    return transformers


def small_model(family: str, *, seed: int = 0) -> tuple[Any, nn.Module]:
    """``(config, model)``: a 4-layer, 256-wide model of ``family`` (table above), its
    weights drawn from ``seed`` (the global random state is left as it was).

    Raises:
        ValueError: ``family`` is not one of :data:`FAMILIES`.
    """
    if family not in FAMILIES:
        from mixprec.formats.names import did_you_mean

        raise ValueError(
            f"family {family!r} is not one of {', '.join(FAMILIES)}"
            f"{did_you_mean(family, FAMILIES)}"
        )
    t = _transformers()
    if family == "gpt2":
        config, cls = t.GPT2Config(n_layer=4, n_embd=256, n_head=4), t.GPT2LMHeadModel
    elif family == "llama":
        config = t.LlamaConfig(
            num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=688,
        )  # fmt: skip
        cls = t.LlamaForCausalLM
    else:
        config = t.BertConfig(
            num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
            intermediate_size=1024, architectures=["BertForMaskedLM"],
        )  # fmt: skip
        cls = t.BertForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return config, cls(config)


def token_batch(
    config: Any, batch_size: int, seq_len: int, *, seed: int = 0
) -> tuple[dict[str, torch.Tensor], None]:
    """``(inputs, None)`` as :func:`mixprec.memory.measure` takes a batch: random token ids
    ``(batch_size, seq_len)`` as ``input_ids`` and as ``labels`` (the model computes its
    own loss, so there is no separate target)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(config.vocab_size, (batch_size, seq_len), generator=g)  # (B, S)
    return {"input_ids": x, "labels": x}, None
