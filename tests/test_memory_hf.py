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
from mixprec.memory.hf_models import FAMILIES, small_model, token_batch

pytest.importorskip("transformers")  # the models are built with it

B, S = 4, 128


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "fp16-mixed", "bf16-master", "bf16-true"])
def test_config_estimate_within_10_percent_of_measured_peak(family, recipe):
    cfg, model = small_model(family)
    predicted = estimate(cfg.to_dict(), recipe, batch_size=B, seq_len=S, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    measured = measure(model, optimizer, recipe, token_batch(cfg, B, S), 2)
    assert measured.source == "cpu-profiler-memory-events"
    ratio = predicted.total / measured.peak
    assert 0.90 <= ratio <= 1.10, (ratio, predicted.parts, measured.breakdown)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "bf16-true"])
def test_saved_tensors_match_the_hf_formula(family, recipe):
    # What the forward pass saves for backward, counted with saved-tensor hooks on the real
    # module (one count per storage; parameters excluded), against activations + copies.
    from mixprec.precision import Precision

    cfg, model = small_model(family)
    precision = Precision(recipe)
    model, _ = precision.setup(model, torch.optim.AdamW(model.parameters()))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    inputs, targets = token_batch(cfg, B, S)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with precision.autocast():
            loss_of(call_model(model, inputs), targets, None)
    e = estimate(cfg.to_dict(), recipe, batch_size=B, seq_len=S, device="cpu")
    counted = sum(saved.values())
    assert abs(e.activations + e.weight_copies - counted) <= 0.02 * counted


def test_small_model_is_seeded_and_names_the_families():
    state = torch.random.get_rng_state()
    (_, a), (_, b) = small_model("llama", seed=1), small_model("llama", seed=1)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is kept
    with pytest.raises(ValueError, match="'lama' is not one of gpt2, llama, bert; did you mean"):
        small_model("lama")
