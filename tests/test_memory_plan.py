"""Planner cases beyond one device: frozen parameters and LoRA, ZeRO / FSDP as DeepSpeed and
FSDP2 do it, optimizer offload, headroom, units, real model signatures, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mixprec.cli import main
from mixprec.memory import estimate, get_spec, measure
from mixprec.memory.report import gb

GB = 1e9


def test_frozen_parameters_get_no_gradients_or_states():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000))
    model[0].weight.requires_grad_(False)  # 64,000 frozen
    e = estimate(model, "fp32")
    trainable = 64 * 1000 + 1000
    assert e.num_trainable == trainable
    assert e.weights == 4 * (64_000 + trainable)
    assert e.gradients == 4 * trainable and e.optimizer_states == 8 * trainable


def test_frozen_embedding_estimate_matches_measured_peak():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20000, 64), nn.Linear(64, 64), nn.ReLU())
    model[0].weight.requires_grad_(False)
    x, y = torch.randint(20000, (8, 16)), torch.randn(8, 16, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    e = estimate(model, "fp32", optimizer=opt, batch=(x, y))
    m = measure(model, opt, "fp32", (x, y), steps=2)
    assert 0.9 <= e.total / m.peak <= 1.1


def test_lora_trains_only_the_adapters():
    spec = get_spec("llama-2-7b")
    e = estimate("llama-2-7b", "bf16-mixed", seq_len=512, lora=(16, ("q_proj", "v_proj")))
    n_lora = spec.num_layers * 2 * 16 * (4096 + 4096)  # r * (in + out) per target
    assert e.num_trainable == n_lora
    assert e.optimizer_states == 8 * n_lora
    assert e.gradients == 4 * n_lora
    assert e.weights == 4 * (spec.num_params + n_lora)
    with pytest.raises(ValueError, match="q_proj"):
        estimate("llama-2-7b", "fp32", lora=(16, ("query",)))


def test_zero1_bf16_master_keeps_the_fp32_grad_buffer_whole():
    # DeepSpeed's BF16_Optimizer: 7.5B on 64 GPUs needs at least 46 GB under ZeRO-1.
    e = estimate(7_500_000_000, "bf16-master", zero_stage=1, world_size=64)
    assert e.master_gradients == 30 * GB
    assert e.model_states >= 46 * GB
    e2 = estimate(7_500_000_000, "bf16-master", zero_stage=2, world_size=64)
    assert e2.master_gradients == -(-30_000_000_000 // 64)


def test_zero3_reserves_the_gathered_layer_and_prefetch():
    e = estimate("llama-3-8b", "bf16-mixed", zero_stage=3, world_size=64, seq_len=1024)
    largest = 128256 * 4096  # the embedding
    assert e.sharding_buffers == largest * (2 + 4) + 50_000_000 * 2
    fsdp = estimate("llama-3-8b", "bf16-mixed", zero_stage="fsdp", world_size=64, seq_len=1024)
    spec = get_spec("llama-3-8b")
    block = (spec.num_params - 2 * 128256 * 4096 - 4096) // 32  # one decoder layer
    assert fsdp.sharding_buffers == block * (2 * 2 + 4)
    assert estimate("llama-3-8b", "bf16-mixed", seq_len=1024).sharding_buffers == 0


def test_offload_moves_optimizer_to_host():
    on = estimate(1_000_000, "bf16-master", offload="optimizer")
    off = estimate(1_000_000, "bf16-master")
    moved = off.master_weights + off.master_gradients + off.optimizer_states
    assert on.host_memory == moved + off.step_transient
    assert on.master_weights == on.optimizer_states == on.master_gradients == 0
    assert off.total - on.total >= moved


def test_headroom_is_stated_and_used_by_the_verdict(capsys):
    e = estimate("gpt2", "bf16-mixed", seq_len=1024)
    assert e.headroom == 2**29 + e.total // 10 and e.required == e.total + e.headroom
    assert estimate("gpt2", "bf16-mixed", seq_len=1024, device="cpu").headroom == 0
    assert main(["estimate", "gpt2", "--seq", "1024", "--device-memory", "2GiB"]) == 0
    assert "headroom" in capsys.readouterr().out


def test_units_fit_the_size():
    assert gb(100) == "100 B"
    assert gb(5 * 2**20) == "5.00 MiB"
    assert gb(3 * 2**30) == "3.00 GiB"


def test_attention_default_is_sdpa_and_eager_keeps_scores():
    sdpa = estimate("mistral-7b", "bf16-mixed", seq_len=4096)
    eager = estimate("mistral-7b", "bf16-mixed", seq_len=4096, attention="eager")
    assert sdpa.attention == "sdpa" and eager.activations > 2 * sdpa.activations


def test_mixtral_counts_all_experts_states_and_top_k_activations():
    e = estimate("mixtral-8x7b", "bf16-mixed", seq_len=1024)
    assert e.num_params == 46_702_792_704
    assert e.optimizer_states == 8 * e.num_params
    one = estimate("mistral-7b", "bf16-mixed", seq_len=1024)
    assert e.activations > one.activations  # two experts per token


class _NanoGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(100, 32), nn.Linear(32, 100)

    def forward(self, idx, targets=None):
        logits = self.head(self.emb(idx))
        if targets is None:
            return logits, None
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_tuple_outputs_and_own_loss_are_accepted():
    x = torch.randint(100, (2, 16))
    by_targets = estimate(_NanoGPT(), "bf16-mixed", batch=(x, x))
    own_loss = estimate(_NanoGPT(), "bf16-mixed", batch=((x, x), None))
    assert by_targets.activations > 0 and own_loss.activations > 0
    m = measure(_NanoGPT(), torch.optim.AdamW(_NanoGPT().parameters()), "fp32", (x, x), 1)
    assert m.peak > 0


def test_module_without_batch_says_activations_are_not_counted():
    e = estimate(_NanoGPT(), "fp32")
    assert e.activations == 0
    assert "not counted" in dict(e.formulas)["activations"]


def test_cli_model_factory_lora_and_offload(capsys):
    assert main(["estimate", "--model", "mixprec.bench.user:example_factory", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parts"]["activations"] > 0
    argv = ["estimate", "llama-2-7b", "--seq", "512", "--lora-rank", "8", "--offload",
            "optimizer", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_trainable"] == 32 * 2 * 8 * (4096 + 4096)
    assert data["host_memory"] > 0
    assert main(["estimate", "llama-2-7b", "--lora-rank", "8", "--lora-targets", "nope"]) == 2
    assert "q_proj" in capsys.readouterr().err
