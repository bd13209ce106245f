"""The formulas behind each part of a :class:`~mixprec.memory.estimate.MemoryEstimate`.

Each function returns ``{part: (bytes, formula)}``; bytes are unsharded until :func:`shard`.
"""

from __future__ import annotations

import torch

from mixprec.formats import get_format
from mixprec.recipes import Recipe

_F32 = torch.float32
Part = tuple[int, str]


def _b(dtype: torch.dtype) -> int:
    """Bytes of one element (torch's own ``dtype.itemsize``)."""
    return dtype.itemsize


def _n(dtype: torch.dtype) -> str:
    """The format registry's short name (``"bf16"``), as every table of mixprec prints it."""
    return get_format(dtype).name


def _terms(terms: list[tuple[int, int, str]]) -> Part:
    """Sum of ``count x bytes`` terms and the formula that says so."""
    terms = [t for t in terms if t[0] and t[1]]
    total = sum(c * b for c, b, _ in terms)
    text = " + ".join(f"{c:,} x {b} B ({label})" for c, b, label in terms) or "0"
    return total, text


def model_states(
    P, recipe: Recipe, optimizer: str, accounting: str, bf16_temp: int | None = None
) -> dict[str, Part]:
    """Weights, gradients, masters, optimizer states, compensation, other state, step temps.

    ``bf16_temp``: for Kahan / stochastic recipes, the bf16-state step's temporaries per
    element (:func:`mixprec.master.bf16_step.step_temp_bytes`); None: the generic
    fp32-view path (fp32 states, fp32 copies of every bf16 param and grad in the step).
    """
    from mixprec.master.bf16_step import CHUNK
    from mixprec.memory.counts import OPTIMIZERS

    p16 = recipe.param_dtype
    low = p16 != _F32
    fp32_norms = low and recipe.keep_norms_fp32 and accounting == "mixprec"
    n_norm = P.norm if fp32_norms else 0
    n_main = P.total - n_norm  # params stored in param_dtype (all of them when fp32)
    w = _terms([(n_main, _b(p16), f"params {_n(p16)}"), (n_norm, 4, "norm params fp32")])
    out: dict[str, Part] = {"weights": w}
    # Only trainable parameters get gradients, masters, optimizer states, compensation.
    frozen = P.total - P.n_train
    n_norm = P.n_norm_train if fp32_norms else 0
    n_main = P.n_train - n_norm

    master = recipe.master_dtype
    n_master = n_main if (master is not None and master != p16) else 0
    mixprec = accounting == "mixprec"
    # Gradients on the model's parameters (same dtype as the parameter, as torch requires).
    # bf16-master (grad_dtype fp32) accumulates them into the fp32 master-gradient buffer
    # as they arrive, so only the fp32 parameters' gradients remain.
    direct = mixprec and n_master and recipe.grad_dtype == _F32 and _F32 != p16
    out["gradients"] = _terms(
        [
            (0 if direct else n_main, _b(p16), f"grads {_n(p16)}"),
            (n_norm, 4, "norm grads fp32"),
        ]
    )
    out["master_weights"] = _terms(
        [(n_master, _b(master) if master else 0, f"master {_n(master) if master else ''}")]
    )
    out["master_gradients"] = _terms([(n_master if mixprec else 0, 4, "fp32 master-grad buffer")])
    k = OPTIMIZERS[optimizer]
    state_dtype = recipe.optimizer_state_dtype
    compensated = mixprec and low and recipe.update != "plain" and master is None
    native = compensated and bf16_temp is not None
    if compensated and not native:
        state_dtype = _F32  # the generic path steps fp32 views of p + c: states follow them
    n_states = P.factored if optimizer == "adafactor" else P.n_train
    label = f"{k} state{'s' if k != 1 else ''} {_n(state_dtype)}"
    if optimizer == "adafactor":
        label = "factored 2nd moment (rows + cols) " + _n(state_dtype)
    counters = P.tensors if (mixprec and optimizer in ("adam", "adamw", "adafactor")) else 0
    if native:  # bf16 states for the bf16 params; torch steps the fp32 norms (fp32 states)
        out["optimizer_states"] = _terms(
            [(n_main, k * _b(p16), label), (n_norm, k * 4, "norm states fp32")]
        )
    else:
        out["optimizer_states"] = _terms([(n_states, k * _b(state_dtype), label)])
    n_comp = n_main if (low and recipe.update == "kahan") else 0
    out["compensation"] = _terms([(n_comp, _b(p16), f"Kahan buffer {_n(p16)}")])
    out["other_state"] = _terms(
        [
            (1, _scaler_bytes(recipe) if mixprec else 0, "loss-scaler state and history"),
            (1, P.buffers, "module buffers"),
            (counters, 4, "optimizer step counters"),
        ]
    )
    if frozen:
        out["weights"] = (out["weights"][0], out["weights"][1] + f"; {frozen:,} frozen")
    # Optimizer step temporaries (mixprec accounting only).
    opt_temp, text = 0, "0"
    if mixprec and optimizer in ("adam", "adamw", "adafactor"):
        b = _b(state_dtype)
        if P.impl == "single":
            opt_temp, text = 2 * P.largest * b, f"2 x {P.largest:,} x {b} B (single-tensor Adam)"
        elif P.impl == "foreach":
            opt_temp, text = P.n_train * b, f"{P.n_train:,} x {b} B (foreach Adam sqrt(v))"
        else:
            text = "0 (fused Adam keeps no temporaries)"
    if native:
        n = min(P.largest, CHUNK)
        opt_temp = bf16_temp * n
        text = f"{bf16_temp} B x {n:,} (fp32 temporaries of the bf16 step's largest chunk)"
    elif compensated:
        n16 = n_main
        tail = 8 * n16 if recipe.update == "kahan" else 12 * n16
        opt_temp = max(8 * n16 + opt_temp, 8 * n16 + tail) - 2 * n16
        text = (
            f"max(8 B x {n16:,} (fp32 value and grad) + optimizer temps, "
            f"{(8 * n16 + tail) // n16} B x {n16:,} ({recipe.update} rounding)) "
            f"- 2 B x {n16:,} (16-bit grads released)"
        )
    out["step_transient"] = (opt_temp, text)
    return out


def _scaler_bytes(recipe: Recipe) -> int:
    from mixprec.precision import Precision

    if recipe.loss_scaling == "none":
        return 0
    # scaling is part of mixprec: a failure here is a defect, never "0 bytes"
    scaler = Precision(recipe).scaler
    scaler.materialize(torch.device("meta"))
    return scaler.nbytes


def numerics_of(recipe: Recipe, device: str):
    """:class:`~mixprec.memory.hf.Numerics` of a recipe: compute bytes, norm bytes, autocast."""
    from mixprec.memory.hf import Numerics

    compute = recipe.compute_dtype or recipe.param_dtype
    e = _b(compute)
    autocast = recipe.uses_autocast and recipe.param_dtype == _F32 and e != 4
    n = 4 if (e == 4 or autocast or recipe.keep_norms_fp32) else e
    return Numerics(e=e, n=n, autocast=autocast, device=device)


def activation_parts(
    recipe,
    P,
    spec,
    module,
    batch,
    loss_fn,
    batch_size,
    seq_len,
    ckpt,
    states,
    attention: str = "sdpa",
    implementation: str = "hf",
    device: str = "cuda",
    fp8_config=None,
    fp8_weights=None,
) -> dict[str, Part]:
    """Weight copies, fp8 copies, activations and the backward transient.

    ``fp8_config``: the Float8Config a traced module is converted with;
    ``fp8_weights``: :class:`mixprec.memory.fp8.Fp8Weights` of the formula paths.
    """
    compute = recipe.compute_dtype or recipe.param_dtype
    if module is not None and batch is not None:
        return _traced(recipe, module, batch, loss_fn, batch_size, fp8_config)
    out: dict[str, Part] = {}
    fp8 = recipe.fp8 != "off"
    copies = P.matmul if recipe.uses_autocast and not fp8 else 0
    out["weight_copies"] = _terms([(copies, _b(compute), f"{_n(compute)} autocast copies")])
    out["fp8_copies"] = fp8_weights.copies if fp8_weights is not None else (0, "0")
    x_fp8 = fp8_weights is not None and fp8_weights.input_fp8  # Linear inputs saved in fp8
    if spec is None:
        what = "an nn.Module" if module is not None else "a parameter count"
        out["activations"] = (0, f"not counted: {what} without a batch (pass batch=)")
        out["backward_transient"] = (0, "not counted (no batch)")
        return out
    out["batch"] = (16 * batch_size * seq_len, "token ids and labels: 2 x s*b x 8 B")
    if implementation == "megatron":
        flash = attention in ("flash", "sdpa")
        out["activations"] = korthikanti(spec, compute, x_fp8, batch_size, seq_len, ckpt, flash)
        out["backward_transient"] = (
            states["gradients"][0],
            "= gradients (all may be alive before activations are freed)",
        )
        return out
    from mixprec.memory.hf import hf_activations, resolve_attention

    kernel = resolve_attention(attention, spec, device)
    num = numerics_of(recipe, device)
    acts, fwd, bwd, text = hf_activations(spec, num, kernel, batch_size, seq_len, ckpt)
    out["activations"] = (acts, text)
    if spec.vocab_head:
        out["backward_transient"] = (
            max(fwd, bwd),
            f"max(loss forward {fwd:,} B (logits, fp32 upcast, CPU scratch), "
            f"loss backward {bwd:,} B (2 x log-softmax bytes x sbV: its gradient and the "
            "logits' gradient))",
        )
    else:
        out["backward_transient"] = (
            states["gradients"][0],
            "= gradients (all may be alive before activations are freed)",
        )
    return out


def korthikanti(
    spec, compute: torch.dtype, fp8: bool, b: int, s: int, ckpt: bool, flash: bool = False
) -> Part:
    """Activation bytes of a transformer, after Korthikanti et al. 2022 (Sec. 4.1).

    Per layer, with e bytes per activation element (2 for 16-bit compute), f bytes per
    saved Linear input (1 with fp8, else e) and m = 1 byte dropout masks (0 without
    dropout)::

        attention: 2sbh*f (QKV and output-projection inputs) + 3sbh*e (Q, K, V)
                   + as^2b*e (softmax) [+ as^2b*(m + e) dropout mask and output] + sbh*m
        MLP (GELU, width ff): sbh*f + sb*ff*e (GELU input) + sb*ff*f + sbh*m
        MLP (SwiGLU):        sbh*f + 3*sb*ff*e (gate, SiLU, up) + sb*ff*f
        norms: 2sbh*e

    which for 16-bit GPT-2/BERT shapes (ff = 4h, dropout) is the paper's sbh(34 + 5as/h).
    With a fused (flash) attention kernel the as^2b terms are replaced by the kernel's
    fp32 log-sum-exp, 4asb bytes (its dropout mask is regenerated, not stored).
    The LM head adds sbh*(e + f) + 4sbV (fp32 log-softmax). With full activation
    checkpointing only each layer's input (sbh*e) is kept, plus one layer recomputed.
    """
    e = _b(compute)
    f = 1 if fp8 else e
    m = 1 if spec.dropout else 0
    h, a, L, ff, V = (
        spec.hidden_size,
        spec.num_heads,
        spec.num_layers,
        spec.intermediate_size,
        spec.vocab_size,
    )
    sbh, sb = s * b * h, s * b
    scores = 4 * a * s * b if flash else a * s * s * b * (e + (m + e if m else 0))
    attn = sbh * (2 * f + 3 * e + m) + scores
    if spec.family == "llama":
        mlp = sbh * f + sb * ff * (3 * e + f)
    else:
        mlp = sbh * (f + m) + sb * ff * (e + f)
    layer = attn + mlp + 2 * sbh * e
    head = sbh * (e + f) + 4 * sb * V if spec.has_lm_head else 0
    embed = sbh * m
    if ckpt:
        total = L * sbh * e + layer + head + embed
        text = f"L*sbh*{e} (layer inputs) + 1 layer recomputed ({layer:,} B)"
    else:
        total = L * layer + head + embed
        c1 = (layer - scores) / sbh
        c2 = e + (m + e if m else 0)
        text = f"L*sbh*{c1:g} + L*4asb (flash)" if flash else f"L*sbh*({c1:g} + {c2:g}*as/h)"
    text += f" + head {head:,} B; s={s}, b={b}, h={h}, a={a}, L={L} [Korthikanti et al. 2022]"
    return total, text


def _traced(recipe, module, batch, loss_fn, batch_size, fp8_config=None) -> dict[str, Part]:
    from mixprec.memory.trace import trace_step

    t = trace_step(module, recipe, batch, loss_fn, fp8_config=fp8_config)
    own_buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    scale = batch_size / t.batch_items
    copies = t.weight_copies + t.fp8_copies
    acts = round((t.forward_end - copies) * scale)
    # the larger of the forward's peak above its end, and backward's peak (gradients kept
    # whole, the rest scaled with the batch)
    bwd = max(
        round((t.forward_peak - t.forward_end) * scale),
        round((t.backward_extra - t.backward_grads) * scale) + t.backward_grads,
    )
    return {
        "weight_copies": (t.weight_copies, "traced: saved copies derived from weights only"),
        "fp8_copies": (
            t.fp8_copies + max(t.buffer_bytes - own_buffers, 0),
            "traced: saved fp8 copies of weights + buffers added by setup",
        ),
        "activations": (
            acts,
            f"traced saved tensors ({t.batch_items} items) x {batch_size}/{t.batch_items}",
        ),
        "batch": (round(t.batch_bytes * scale), "the micro-batch tensors"),
        "backward_transient": (
            bwd,
            "traced: backward peak above the end of the forward",
        ),
    }


_SHARD_STAGE = {
    "master_weights": 1, "master_gradients": 1, "optimizer_states": 1, "compensation": 1,
    "step_transient": 1, "gradients": 2, "weights": 3, "weight_copies": 3, "fp8_copies": 3,
}  # fmt: skip


def shard(
    parts: dict[str, Part], stage: int, world: int, recipe: Recipe | None = None
) -> dict[str, Part]:
    """Divide each part sharded at this ZeRO stage by the world size (ceiling).

    A bf16 master-weight recipe accumulates gradients into an fp32 buffer the size of the
    model; DeepSpeed's BF16_Optimizer keeps that buffer whole under ZeRO-1 and partitions
    it from stage 2, so ``master_gradients`` is sharded from stage 2 there.
    """
    stages = dict(_SHARD_STAGE)
    if recipe is not None and recipe.master_dtype is not None and recipe.grad_dtype == _F32:
        stages["master_gradients"] = 2
    out = {}
    for name, (nbytes, text) in parts.items():
        if world > 1 and stage >= stages.get(name, 99) and nbytes:
            nbytes, text = -(-nbytes // world), f"({text}) / {world} (ZeRO-{stage})"
        out[name] = (nbytes, text)
    if "= gradients" in out.get("backward_transient", (0, ""))[1]:
        out["backward_transient"] = (out["gradients"][0], parts["backward_transient"][1])
    return out


# DeepSpeed's default stage3_prefetch_bucket_size (elements)
PREFETCH_BUCKET = 50_000_000


def sharding_buffers(P, recipe: Recipe, stage: int, world: int, fsdp: bool) -> Part:
    """Unsharded working set of ZeRO-3 / FSDP2: what is gathered while a layer runs.

    DeepSpeed ZeRO-3 (its ``estimate_zero3_model_states_mem_needs`` reserves 4 B x largest
    layer)::

        largest * (p + g) + min(prefetch bucket, total) * p

    FSDP2 (``fully_shard`` per block; the next block is prefetched; gradients are
    reduce-scattered after the block's backward)::

        block * (2 * p + g)

    with p, g the bytes of a parameter and of its gradient (the compute dtype under
    autocast), largest the largest parameter tensor and block one transformer block.
    """
    if stage < 3 or world <= 1:
        return 0, "0 (not ZeRO-3 / FSDP)"
    p = _b(recipe.compute_dtype or recipe.param_dtype)
    g = _b(recipe.param_dtype)
    if fsdp:
        block = P.layer or P.largest
        return block * (2 * p + g), f"{block:,} x (2 x {p} + {g}) B (FSDP2: block + prefetch)"
    bucket = min(PREFETCH_BUCKET, P.total)
    return (
        P.largest * (p + g) + bucket * p,
        f"{P.largest:,} x ({p} + {g}) B (largest layer gathered, and its gradient) + "
        f"{bucket:,} x {p} B (prefetch bucket) [DeepSpeed ZeRO-3]",
    )
