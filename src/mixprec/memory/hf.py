"""Activations as the Hugging Face implementations save them (``implementation="hf"``).

Counted from what the ``transformers`` code of each family keeps for backward (the tests
count it again with ``saved_tensors_hooks`` on the real modules, on a CPU), per micro-batch
of b sequences of s tokens (sbh = s*b*h elements), with:

* ``e``: bytes of the compute dtype (4 fp32, 2 for fp16/bf16 autocast or 16-bit params);
* ``n``: bytes of the input a norm saves: 4 unless the parameters are 16-bit and norms are
  not kept fp32 (LayerNorm and HF's RMSNorm compute in fp32 under autocast);
* ``c(k)``: copies of a norm's output saved by the k Linear layers reading it: under
  autocast each Linear casts its fp32 input itself (k copies of e bytes), else one;
* ``m(x)``: dropout mask bytes for an x-byte tensor: x on a CPU (``input * noise``), 1 on
  CUDA (fused kernel, bool mask), 0 without dropout;
* attention, per kernel (``sdpa`` resolves to ``math`` on a CPU when the attention has
  dropout, else ``flash``; on CUDA to ``flash``)::

      flash: (sbh + 2*sb*kv*d)*e (q, k, v) + sbh*e (output = out-proj input) + 4*a*s*b (lse)
      math (CPU): 3*4*sbh (fp32 q, k, v; 16-bit inputs are upcast) + sbh*e (out-proj input)
                  + a*s*s*b*(4 [+ 4 + 4 with dropout]) (probs [, mask, dropped probs])
      eager: (sbh + 2*sbh)*e (q, k, v; k, v repeated to all heads) + sbh*e (out-proj input)
             + a*s*s*b*(4 + (m(e) + e with dropout, else e if e != 4 else 0))

Per layer (plus attention):

* gpt2 (``GPT2Block``, Conv1D, gelu_new)::

      2*(n*sbh + 8sb) (ln_1, ln_2) + 2*e*sbh (c_attn, c_fc inputs) + 2*m(e)*sbh
      + 4*e*sb*ff (gelu_new keeps four tensors) + e*sb*ff (c_proj input)

* bert (``BertLayer``, post-norm, exact GELU)::

      c(3)*sbh + 2*(n*sbh + 8sb) + e*sbh + 2*m(e)*sbh + 2*e*sb*ff

* llama family (``LlamaDecoderLayer``: Python RMSNorm keeps its input and the fp32
  normalised tensor; SwiGLU)::

      2*((n + 4)*sbh + 4sb) + c(3)*sbh + c(2)*sbh + k*4*e*sb*ff  (k: experts per token)

Outside the layers: the embedding dropout (gpt2, bert), the final norm, the head's input
and, for a vocabulary head, the log-softmax the loss keeps: ``l*sbV`` with l = 4 for the
causal-LM loss (it upcasts the logits) and for fp32 / autocast, else e (BERT's MLM loss on
16-bit logits). The loss itself holds ``e*sbV`` logits and, when it upcasts, ``4*sbV``
more while it runs (and on a CPU a 16-bit log-softmax an fp32 scratch of ``4*sbV``); its
backward holds ``2*l*sbV`` (the gradient of the log-softmax and of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Numerics", "hf_activations", "resolve_attention"]


@dataclass(frozen=True, slots=True)
class Numerics:
    """Bytes per element of what a recipe computes with, and where it runs.

    Args:
        e: compute dtype bytes.
        n: bytes of a norm's saved input.
        autocast: 16-bit autocast over fp32 parameters (Linear layers copy their inputs).
        device: ``"cuda"`` or ``"cpu"`` (dropout masks, SDPA kernel choice).
    """

    e: int
    n: int
    autocast: bool
    device: str

    def mask(self, nbytes: int, dropout: bool) -> int:
        """Bytes per element of a dropout mask on an ``nbytes`` tensor."""
        if not dropout:
            return 0
        return nbytes if self.device == "cpu" else 1

    def copies(self, readers: int) -> int:
        """Saved copies of a norm output read by ``readers`` Linear layers."""
        return readers if self.autocast else 1


def resolve_attention(attention: str, spec, device: str) -> str:
    """The kernel that runs: ``"eager"``, ``"flash"`` or ``"math"`` (CPU SDPA with dropout)."""
    if attention != "sdpa":
        return attention
    if device == "cpu" and spec.attention_dropout:
        return "math"
    return "flash"


def _attention(kernel: str, spec, num: Numerics, s: int, b: int) -> int:
    h, a, e = spec.hidden_size, spec.num_heads, num.e
    sbh, kvd = s * b * h, spec.kv_heads * spec.head_dim
    scores = a * s * s * b
    drop = spec.attention_dropout
    if kernel == "flash":
        return (sbh + 2 * s * b * kvd) * e + sbh * e + 4 * a * s * b
    if kernel == "math":
        return 3 * 4 * sbh + sbh * e + scores * (12 if drop else 4)
    probs = 4 + ((num.mask(e, True) + e) if drop else (e if e != 4 else 0))
    return 3 * sbh * e + sbh * e + scores * probs


def hf_activations(spec, num: Numerics, kernel: str, b: int, s: int, ckpt: bool) -> tuple:
    """(saved bytes, loss forward transient, loss backward transient, formula text).

    See the module docstring for every term.
    """
    h, L, ff, V, e, n = (
        spec.hidden_size, spec.num_layers, spec.intermediate_size, spec.vocab_size,
        num.e, num.n,
    )  # fmt: skip
    sb, sbh = s * b, s * b * h
    drop = spec.dropout
    attn = _attention(kernel, spec, num, s, b)
    if spec.family == "gpt2":
        layer = 2 * (n * sbh + 8 * sb) + 2 * e * sbh + 2 * num.mask(e, drop) * sbh
        layer += 5 * e * sb * ff
        residual = 4 if num.autocast or e == 4 else e
        outside = num.mask(residual, drop) * sbh + n * sbh + 8 * sb + e * sbh
    elif spec.family == "bert":
        layer = num.copies(3) * e * sbh + 2 * (n * sbh + 8 * sb) + e * sbh
        layer += 2 * num.mask(e, drop) * sbh + 2 * e * sb * ff
        norm_out = 4 if num.autocast or e == 4 else e
        outside = n * sbh + 8 * sb + num.mask(norm_out, drop) * sbh  # embeddings
        if spec.head == "mlm":  # transform dense input, GELU input, LayerNorm, decoder input
            outside += e * sbh + e * sbh + n * sbh + 8 * sb + e * sbh
    else:
        k = spec.experts_per_token or 1
        layer = 2 * ((n + 4) * sbh + 4 * sb) + (num.copies(3) + num.copies(2)) * e * sbh
        layer += k * 4 * e * sb * ff
        if spec.num_experts:  # router logits (fp32 softmax) and routing weights
            layer += 2 * 4 * sb * spec.num_experts
        outside = (n + 4) * sbh + 4 * sb + e * sbh
    layer += attn
    loss_saved = loss_fwd = loss_bwd = 0
    if spec.vocab_head:
        causal = spec.family != "bert"
        lsm = 4 if (causal or num.autocast or e == 4) else e
        loss_saved = lsm * sb * V
        upcast = 4 * sb * V if lsm != e else 0
        scratch = 4 * sb * V if (num.device == "cpu" and lsm == 2) else 0
        loss_fwd = e * sb * V + upcast + scratch
        loss_bwd = 2 * lsm * sb * V
    if ckpt:
        body = L * e * sbh + layer
        text = f"L*sbh*{e} (layer inputs) + 1 layer recomputed ({layer:,} B)"
    else:
        body = L * layer
        text = f"L x {layer:,} B per layer ({layer / sbh:.4g} sbh, {kernel} attention)"
    total = body + outside + loss_saved
    text += (
        f" + {outside:,} B outside the layers + {loss_saved:,} B log-softmax; "
        f"s={s}, b={b}, h={h}, L={L}, e={e}, n={n} [Hugging Face {spec.family} code]"
    )
    return total, loss_fwd, loss_bwd, text
