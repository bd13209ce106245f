"""The planner against real Hugging Face models: estimate from config.json vs measured peak.

The models are built from configs, offline (transformers is a test dependency only; the
planner never imports it). Measured with :func:`mixprec.memory.measure`, which on a CPU
reads the allocator's events through the profiler (no dispatch mode in the measured run).
"""

from __future__ import annotations

import pytest
import torch

from mixprec.memory import estimate, measure
from mixprec.memory.calls import call_model, loss_of

transformers = pytest.importorskip("transformers")

B, S = 4, 128


def _build(family: str):
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


def _batch(cfg):
    x = torch.randint(cfg.vocab_size, (B, S))
    return {"input_ids": x, "labels": x}, None


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "fp16-mixed", "bf16-master", "bf16-true"])
def test_config_estimate_within_10_percent_of_measured_peak(family, recipe):
    cfg, model = _build(family)
    predicted = estimate(cfg.to_dict(), recipe, batch_size=B, seq_len=S, device="cpu")
    measured = measure(model, torch.optim.AdamW(model.parameters()), recipe, _batch(cfg), 2)
    assert measured.source == "cpu-profiler-memory-events"
    ratio = predicted.total / measured.peak
    assert 0.90 <= ratio <= 1.10, (ratio, predicted.parts, measured.breakdown)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "bf16-true"])
def test_saved_tensors_match_the_hf_formula(family, recipe):
    # What the forward pass saves for backward, counted with saved-tensor hooks on the real
    # module (one count per storage; parameters excluded), against activations + copies.
    from mixprec.precision import Precision

    cfg, model = _build(family)
    precision = Precision(recipe)
    model, _ = precision.setup(model, torch.optim.AdamW(model.parameters()))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    inputs, targets = _batch(cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with precision.autocast():
            loss_of(call_model(model, inputs), targets, None)
    e = estimate(cfg.to_dict(), recipe, batch_size=B, seq_len=S, device="cpu")
    counted = sum(saved.values())
    assert abs(e.activations + e.weight_copies - counted) <= 0.02 * counted
