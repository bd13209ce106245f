"""Model presets: the fields of the published Hugging Face ``config.json`` files.

One entry per model; :func:`mixprec.memory.specs.get_spec` reads them exactly as it reads
a ``config.json``. Parameter counts (asserted in the tests against the model cards):
gpt2 124,439,808; bert-base-uncased (``BertForMaskedLM``) 109,514,298; llama-2-7b
6,738,415,616; mistral-7b 7,241,732,096; qwen2-7b 7,615,616,512; gemma-2b 2,506,172,416;
phi-3-mini 3,821,079,552; mixtral-8x7b 46,702,792,704.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]


def _gpt2(n_embd: int, n_layer: int, n_head: int) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
    }


def _bert(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": 30522,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    }


def _llama(
    vocab: int,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    positions: int,
    model_type: str = "llama",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": positions,
        "tie_word_embeddings": False,
        **extra,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "bert-base-uncased": _bert(768, 12, 12),
    "bert-large-uncased": _bert(1024, 24, 16),
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, 8, 32768, "mistral"),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192),
    "qwen2-7b": _llama(152064, 3584, 18944, 28, 28, 4, 131072, "qwen2"),
    "gemma-2b": _llama(
        256000, 2048, 16384, 18, 8, 1, 8192, "gemma", tie_word_embeddings=True, head_dim=256
    ),
    "phi-3-mini": _llama(32064, 3072, 8192, 32, 32, 32, 4096, "phi3"),
    "mixtral-8x7b": _llama(
        32000,
        4096,
        14336,
        32,
        32,
        8,
        32768,
        "mixtral",
        num_local_experts=8,
        num_experts_per_tok=2,
    ),  # fmt: skip
}
