"""Transformer shapes: presets, Hugging Face ``config.json`` parsing, closed-form counts.

A :class:`ModelSpec` is the handful of numbers that decide a transformer's memory. It comes
from a preset name (``get_spec("llama-2-7b")``), from a Hugging Face style ``config.json``
(``load_config(path)``) or is written by hand. Parameter counts are closed-form sums over the
layers of the Hugging Face implementation of each family (no model is built):

* gpt2 (``GPT2Model``, LM head tied to the token embedding)::

      V*h + P*h + L*(4*h*h + 2*h*ff + 9*h + ff) + 2*h   (ff = 4h: L*(12*h*h + 13*h))

* bert: the encoder ``(V + P + T)*h + 2*h + L*(4*h*h + 2*h*ff + 9*h + ff)`` plus its head:
  ``BertForMaskedLM`` (``head="mlm"``, what the published checkpoints are):
  ``h*h + h + 2*h + V`` (transform, LayerNorm, decoder bias; decoder tied);
  ``BertForSequenceClassification`` (``"cls"``): ``h*h + h + h*n + n`` (pooler, classifier);
  ``BertModel`` (``"base"``): the pooler ``h*h + h``.

* llama family: llama, mistral, qwen2 (q/k/v biases), gemma (tied), phi3 (fused q/k/v and
  gate/up: the same counts), mixtral (E experts, router)::

      V*h*(1 if tied else 2) + h
      + L*(2*h*h + 2*h*kv*d + E*3*h*ff + 2*h [+ h + 2*kv*d biases] [+ h*E router])

with V vocabulary, P positions, T token types, h width, ff MLP width, L layers, kv KV heads,
d = h / heads the head width and E = 1 without experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mixprec.formats.names import unknown

__all__ = [
    "PRESETS",
    "ModelSpec",
    "ParamCounts",
    "get_spec",
    "load_config",
    "preset_names",
    "spec_from_config",
]

from mixprec.memory.presets import PRESETS  # noqa: E402  (plain data, no cycle)

Family = Literal["gpt2", "bert", "llama"]
_FAMILIES = ("gpt2", "bert", "llama")
_BERT_HEADS = ("mlm", "cls", "base")


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Parameters of a model, split by how recipes treat them.

    Args:
        total: every parameter.
        norm: parameters of normalisation layers (kept fp32 by ``keep_norms_fp32``).
        matmul: parameters read by matrix multiplies (Linear weights and biases, a tied
            LM head once more): these get autocast / fp8 copies in the forward pass.
        linear_weights: the weight matrices of Linear layers (fp8 copies are made of these).
        linear_layers: number of Linear layers (each fp8 Linear keeps scale state).
    """

    total: int
    norm: int
    matmul: int
    linear_weights: int
    linear_layers: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a transformer, enough to count its parameters and activations.

    Args:
        name: label (preset name or config path).
        family: ``"gpt2"``, ``"bert"`` or ``"llama"`` (mistral, qwen2, gemma, phi3 and
            mixtral are llama-shaped).
        vocab_size: V, token ids.
        hidden_size: h, width of the residual stream.
        num_layers: L, transformer blocks.
        num_heads: a, attention heads.
        intermediate_size: ff, MLP width.
        max_position_embeddings: longest sequence; the default ``seq_len`` of estimates.
        num_kv_heads: key/value heads (grouped-query attention); defaults to ``num_heads``.
        tie_word_embeddings: the LM head shares the token embedding (llama family).
        type_vocab_size: token-type embeddings (bert).
        dropout: the model has dropout layers on the residual stream (their masks are
            activations).
        attention_dropout: dropout on the attention probabilities (decides the kernel
            SDPA can use on a CPU, and the eager path's saved mask).
        head: bert only: ``"mlm"`` (masked-LM head), ``"cls"`` (sequence classification)
            or ``"base"`` (encoder and pooler).
        num_labels: classes of the ``"cls"`` head.
        qkv_bias: llama family: q/k/v projections have biases (qwen2).
        num_experts: mixture-of-experts MLPs per layer (0: a dense MLP).
        experts_per_token: experts each token is routed to (top-k).
        model_type: the Hugging Face ``model_type`` it was read as.

    Example:
        >>> get_spec("gpt2").num_params
        124439808
    """

    name: str
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    num_kv_heads: int | None = None
    tie_word_embeddings: bool = False
    type_vocab_size: int = 0
    dropout: bool = False
    attention_dropout: bool = False
    head: str = "mlm"
    num_labels: int = 2
    qkv_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    model_type: str = ""

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {', '.join(_FAMILIES)}")
        if self.head not in _BERT_HEADS:
            raise ValueError(f"head={self.head!r} is not one of {', '.join(_BERT_HEADS)}")
        if self.num_experts < 0 or not 0 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} must be between 0 and "
                f"num_experts={self.num_experts} in {self.name!r}"
            )
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field}={value!r} in {self.name!r} must be a positive int")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} in {self.name!r} is not a multiple of "
                f"num_heads={self.num_heads}"
            )
        kv = self.kv_heads
        if kv <= 0 or self.num_heads % kv:
            raise ValueError(
                f"num_kv_heads={kv} in {self.name!r} must be positive and divide "
                f"num_heads={self.num_heads}"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads (equal to ``num_heads`` without grouped-query attention)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``h / a``."""
        return self.hidden_size // self.num_heads

    @property
    def has_lm_head(self) -> bool:
        """Decoder language models end in a vocabulary projection (logits)."""
        return self.family in ("gpt2", "llama")

    @property
    def vocab_head(self) -> bool:
        """The model ends in a vocabulary projection (logits over V): LM and MLM heads."""
        return self.has_lm_head or (self.family == "bert" and self.head == "mlm")

    @property
    def experts(self) -> int:
        """MLPs per layer (1 for a dense model)."""
        return max(self.num_experts, 1)

    @property
    def num_params(self) -> int:
        """Total parameters, in closed form (see the module docstring)."""
        return self.param_counts().total

    def param_counts(self) -> ParamCounts:
        """Parameters split by role (norm / matmul / Linear weights), in closed form."""
        V, h, L, ff = self.vocab_size, self.hidden_size, self.num_layers, self.intermediate_size
        P = self.max_position_embeddings
        if self.family == "gpt2":
            # c_attn h->3h, c_proj h->h, c_fc h->ff, c_proj ff->h, all with bias; 2 LayerNorms.
            lin_w = 3 * h * h + h * h + 2 * h * ff
            lin_b = 3 * h + h + ff + h
            norm = L * 4 * h + 2 * h
            embed = V * h + P * h
            head = V * h  # tied: no new parameters, but a matmul (and its copy)
            total = embed + L * (lin_w + lin_b) + norm
            return ParamCounts(total, norm, L * (lin_w + lin_b) + head, L * lin_w + head, 4 * L + 1)
        if self.family == "bert":
            # Q, K, V, out h->h; intermediate h->ff; output ff->h; all with bias; pooler h->h.
            lin_w = 4 * h * h + 2 * h * ff
            lin_b = 4 * h + ff + h
            norm = L * 4 * h + 2 * h
            embed = (V + P + self.type_vocab_size) * h
            n = self.num_labels
            # head: (Linear weights, Linear biases, norm params, other params, Linear layers)
            head_w, head_b, head_norm, extra, layers = {
                "mlm": (h * h + V * h, h + V, 2 * h, -V * h, 2),  # decoder tied: no new params
                "cls": (h * h + h * n, h + n, 0, 0, 2),
                "base": (h * h, h, 0, 0, 1),
            }[self.head]
            norm += head_norm
            total = embed + L * (lin_w + lin_b) + norm + head_w + head_b + extra
            matmul = L * (lin_w + lin_b) + head_w + head_b
            return ParamCounts(total, norm, matmul, L * lin_w + head_w, 6 * L + layers)
        # llama: q, o h->h; k, v h->kv*d; gate, up h->ff; down ff->h (per expert); 2 RMSNorms.
        kv_dim = self.kv_heads * self.head_dim
        E = self.experts
        router = h * self.num_experts
        lin_w = 2 * h * h + 2 * h * kv_dim + E * 3 * h * ff + router
        lin_b = h + 2 * kv_dim if self.qkv_bias else 0
        norm = L * 2 * h + h
        head = V * h
        total = V * h + L * (lin_w + lin_b) + norm + (0 if self.tie_word_embeddings else head)
        layers = 7 * E + (1 if self.num_experts else 0)
        return ParamCounts(
            total, norm, L * (lin_w + lin_b) + head, L * lin_w + head, layers * L + 1
        )


# -- config.json parsing --------------------------------------------------------------------
# Per family: spec field -> (config key, default or _REQUIRED).
_REQUIRED = object()
_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "gpt2": {
        "vocab_size": ("vocab_size", _REQUIRED),
        "hidden_size": ("n_embd", _REQUIRED),
        "num_layers": ("n_layer", _REQUIRED),
        "num_heads": ("n_head", _REQUIRED),
        "max_position_embeddings": ("n_positions", _REQUIRED),
        "intermediate_size": ("n_inner", None),  # None: 4 * n_embd
        "dropout": ("resid_pdrop", 0.1),
        "attention_dropout": ("attn_pdrop", 0.1),
    },
    "bert": {
        "vocab_size": ("vocab_size", _REQUIRED),
        "hidden_size": ("hidden_size", _REQUIRED),
        "num_layers": ("num_hidden_layers", _REQUIRED),
        "num_heads": ("num_attention_heads", _REQUIRED),
        "intermediate_size": ("intermediate_size", _REQUIRED),
        "max_position_embeddings": ("max_position_embeddings", _REQUIRED),
        "type_vocab_size": ("type_vocab_size", 2),
        "dropout": ("hidden_dropout_prob", 0.1),
        "attention_dropout": ("attention_probs_dropout_prob", 0.1),
    },
    "llama": {
        "vocab_size": ("vocab_size", _REQUIRED),
        "hidden_size": ("hidden_size", _REQUIRED),
        "num_layers": ("num_hidden_layers", _REQUIRED),
        "num_heads": ("num_attention_heads", _REQUIRED),
        "intermediate_size": ("intermediate_size", _REQUIRED),
        "max_position_embeddings": ("max_position_embeddings", _REQUIRED),
        "num_kv_heads": ("num_key_value_heads", None),
        "tie_word_embeddings": ("tie_word_embeddings", False),
        "attention_dropout": ("attention_dropout", 0.0),
        "num_experts": ("num_local_experts", 0),
        "experts_per_token": ("num_experts_per_tok", 0),
    },
}
# Hugging Face model_type -> family.
_MODEL_TYPES = {
    "gpt2": "gpt2", "bert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "gemma": "llama", "phi3": "llama", "mixtral": "llama",
}  # fmt: skip
# model_type -> tie_word_embeddings when the config does not say (transformers' defaults)
_TIED_DEFAULT = {"gemma": True, "qwen2": False}
_BERT_ARCHS = {"BertForMaskedLM": "mlm", "BertForPreTraining": "mlm",
               "BertForSequenceClassification": "cls", "BertModel": "base"}  # fmt: skip


def spec_from_config(config: dict[str, Any], source: str = "config") -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed Hugging Face ``config.json``.

    Args:
        config: the parsed JSON object.
        source: where it came from, named in errors (a file path).

    Raises:
        ValueError: unknown ``model_type``, or a needed key missing (naming key and source).

    Example:
        >>> spec_from_config(PRESETS["gpt2"], "gpt2").num_params
        124439808
    """
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"{source}: missing key 'model_type' (one of {', '.join(_MODEL_TYPES)})")
    family = _MODEL_TYPES.get(str(model_type))
    if family is None:
        raise ValueError(
            f"{source}: model_type={model_type!r} is not supported; "
            f"choose one of {', '.join(_MODEL_TYPES)}"
        )
    fields: dict[str, Any] = {"model_type": str(model_type)}
    keys = dict(_KEYS[family])
    if model_type in _TIED_DEFAULT:
        keys["tie_word_embeddings"] = ("tie_word_embeddings", _TIED_DEFAULT[model_type])
    if model_type != "mixtral":
        keys.pop("num_experts", None), keys.pop("experts_per_token", None)
    for field, (key, default) in keys.items():
        if key in config and config[key] is not None:
            fields[field] = config[key]
        elif default is _REQUIRED:
            raise ValueError(f"{source}: missing key {key!r} needed for a {model_type} model")
        else:
            fields[field] = default
    if family == "gpt2" and fields["intermediate_size"] is None:
        fields["intermediate_size"] = 4 * fields["hidden_size"]
    if family == "llama" and config.get("head_dim") not in (
        None,
        fields["hidden_size"] // fields["num_heads"],
    ):
        raise ValueError(f"{source}: head_dim different from hidden_size / heads is not supported")
    fields["dropout"] = bool(fields.get("dropout"))
    fields["attention_dropout"] = bool(fields["attention_dropout"])
    if family == "bert":
        archs = config.get("architectures") or ["BertForMaskedLM"]
        fields["head"] = _BERT_ARCHS.get(archs[0], "base")
        labels = config.get("id2label")
        fields["num_labels"] = int(config.get("num_labels") or (len(labels) if labels else 2))
    if model_type == "qwen2":
        fields["qkv_bias"] = True
    return ModelSpec(name=source, family=family, **fields)


def load_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (or a folder holding one) into a ModelSpec.

    Example:
        >>> load_config("checkpoints/llama/config.json").num_params  # doctest: +SKIP
        6738415616
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return spec_from_config(config, str(path))


def preset_names() -> list[str]:
    """Names of the built-in model presets."""
    return list(PRESETS)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a preset.

    Raises:
        ValueError: for an unknown name, listing the presets.

    Example:
        >>> get_spec("llama-2-7b").num_params
        6738415616
    """
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(unknown("model", name, PRESETS, "(or a config.json path)"))
    return spec_from_config(PRESETS[key], key)
