"""Integrations with the real frameworks: Lightning (Trainer, Fabric), HF Trainer, TensorBoard.

Each framework run is checked against the plain mixprec loop on the same model and batches:
the plugin must do exactly what ``Precision`` does (bit-identical parameters).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import Precision
from mixprec.numerics import Monitor
from tests.conftest import RECIPE_NAMES, TinyNet

DONE_WHEN = ["bf16-mixed", "fp16-mixed", "bf16-true", "fp8-mixed"]


# -- a tiny model and its batches ---------------------------------------------------------
def _data(n: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _loader(n: int = 32):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(n)), batch_size=8)


def _plain(recipe: str, epochs: int, max_grad_norm=None) -> list[torch.Tensor]:
    """The reference: the plain mixprec loop on the same model, optimizer and batches."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    precision = Precision(recipe)
    model, opt = precision.setup(model, opt)
    for _ in range(epochs):
        for x, y in _loader():
            with precision.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            precision.backward(loss)
            precision.step(opt, max_grad_norm=max_grad_norm)
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(got, want, recipe):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype, recipe
        assert torch.equal(a.detach(), b), recipe


# -- metrics and TensorBoard --------------------------------------------------------------
def test_metrics_report_scale_skips_grad_norm_and_monitor_summaries():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    precision = Precision("fp16-mixed")
    model, opt = precision.setup(model, opt)
    x, y = _data(8)
    with Monitor(model, formats=["fp16"]) as monitor:
        for poison in (False, True, False):
            with precision.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            precision.backward(loss * (float("inf") if poison else 1.0))
            precision.step(opt, max_grad_norm=1.0)
            monitor.step(scale=precision.scaler.scale)
        m = precision.metrics(monitor)
    assert m["precision/steps"] == 3
    assert m["precision/skipped_steps"] == 1  # the poisoned step
    assert m["precision/skip_rate"] == pytest.approx(1 / 3)
    assert m["precision/loss_scale"] == precision.scaler.get_scale() == 2.0**15  # backed off
    assert m["precision/grad_norm"] == pytest.approx(precision.last_grad_norm.item())
    assert m["numerics/step"] == 2
    assert m["numerics/nonfinite_tensors"] == 0
    stats = monitor.stats("fc1", "output", step=2)
    assert m["numerics/fc1/output/max_abs"] == stats.max_abs
    assert m["numerics/fc1/output/lost_fp16"] == stats.lost_fraction("fp16")
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_metrics_of_an_unscaled_recipe():
    m = Precision("bf16-mixed").metrics()
    assert m == {
        "precision/loss_scale": 1.0,
        "precision/steps": 0,
        "precision/skipped_steps": 0,
        "precision/skip_rate": 0.0,
    }


def test_tensorboard_logger_writes_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mixprec.integrations.tensorboard import TensorBoardLogger

    metrics = {"precision/loss_scale": 1024.0, "precision/skipped_steps": 2}
    with TensorBoardLogger(tmp_path) as tb:
        assert tb.log(metrics, step=7) == 2
        with pytest.raises(TypeError, match="precision/bad"):
            tb.log({"precision/bad": "x"}, step=7)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(metrics)
    (point,) = events.Scalars("precision/loss_scale")
    assert (point.step, point.value) == (7, 1024.0)


# -- Lightning ----------------------------------------------------------------------------
try:
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from mixprec.integrations.lightning import MixprecPrecision, NumericsMonitor
except ImportError:  # the [lightning] extra is not installed
    L = None
    Logger = LightningModule = object
else:
    LightningModule = L.LightningModule
needs_lightning = pytest.mark.skipif(L is None, reason="needs mixprec[lightning]")


class _Module(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class _Recorder(Logger):
    """A real Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _trainer(tmp_path, recipe, *, epochs, callbacks=(), **kwargs):
    return L.Trainer(
        max_epochs=epochs,
        plugins=[MixprecPrecision(recipe)],
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@needs_lightning
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_lightning_trainer_matches_the_plain_loop(tmp_path, recipe):
    module = _Module()
    monitor = NumericsMonitor(formats=["fp16", "fp8_e4m3fn"])
    recorder = _Recorder()
    trainer = _trainer(
        tmp_path, recipe, epochs=1, callbacks=[monitor], logger=recorder, log_every_n_steps=2
    )
    trainer.fit(module, _loader())
    _assert_same(list(module.net.parameters()), _plain(recipe, epochs=1), recipe)
    # the monitor's report is written, and the metrics went through Lightning's logger
    report = json.loads(monitor.report_path.read_text())
    assert [s["step"] for s in report["steps"]] == [0, 1, 2, 3]
    steps = [s for s, m in recorder.logged if "precision/loss_scale" in m]
    assert steps == [2, 4]
    assert any(k.startswith("numerics/net.fc1/output/") for k in recorder.logged[-1][1])
    # the loss scale of each step reached the monitor when (and only when) a scaler ran
    scaler = trainer.precision_plugin.mixprec.scaler
    assert len(monitor.monitor.scales) == (4 if scaler.enabled else 0)


@needs_lightning
def test_lightning_gradient_clip_val_clips_the_unscaled_gradients(tmp_path):
    module = _Module()
    trainer = _trainer(tmp_path, "fp16-mixed", epochs=1, gradient_clip_val=0.05, logger=False)
    trainer.fit(module, _loader())
    _assert_same(list(module.net.parameters()), _plain("fp16-mixed", 1, max_grad_norm=0.05), "")
    module = _Module()
    trainer = _trainer(
        tmp_path, "fp16-mixed", epochs=1, gradient_clip_val=0.05, logger=False,
        gradient_clip_algorithm="value",
    )  # fmt: skip
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        trainer.fit(module, _loader())


@needs_lightning
def test_lightning_runs_the_modules_own_backward_on_the_scaled_loss(tmp_path):
    class Overridden(_Module):
        seen: list[float] = []

        def backward(self, loss, *args, **kwargs):
            self.seen.append(loss.item())
            loss.backward(*args, **kwargs)

    module = Overridden()
    trainer = _trainer(tmp_path, "fp16-mixed", epochs=1, logger=False)
    trainer.fit(module, _loader())
    assert len(module.seen) == 4  # one per training step
    assert min(module.seen) > 2.0**10  # the scaled loss (init scale 2**16), not the loss
    _assert_same(list(module.net.parameters()), _plain("fp16-mixed", epochs=1), "fp16-mixed")


# bf16-true with stochastic rounding: the rounding generator's state must resume too
BF16_TRUE_SR = "params=bf16,compute=bf16,grads=bf16,update=stochastic"


@needs_lightning
@pytest.mark.parametrize(
    "recipe", ["fp16-mixed", "fp16-master", "bf16-master", "bf16-true", BF16_TRUE_SR]
)
def test_lightning_resume_from_checkpoint_is_bit_exact(tmp_path, recipe):
    straight = _Module()
    _trainer(tmp_path / "a", recipe, epochs=2, logger=False).fit(straight, _loader())

    first = _Module()
    trainer = _trainer(tmp_path / "b", recipe, epochs=1, logger=False)
    trainer.fit(first, _loader())
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "mixprec" in torch.load(ckpt, weights_only=False)["MixprecPrecision"]

    torch.manual_seed(123)  # a fresh process: another init, then the checkpoint
    resumed = _Module()
    for p in resumed.parameters():
        nn.init.normal_(p)
    _trainer(tmp_path / "c", recipe, epochs=2, logger=False).fit(resumed, _loader(), ckpt_path=ckpt)
    _assert_same(list(resumed.net.parameters()), list(straight.net.parameters()), recipe)


@needs_lightning
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_lightning_fabric_matches_the_plain_loop(recipe):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[MixprecPrecision(recipe)])
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fmodel, fopt = fabric.setup(model, opt)
    for x, y in _loader():
        loss = F.cross_entropy(fmodel(x).float(), y)
        fabric.backward(loss)
        fopt.step()
    _assert_same(list(model.parameters()), _plain(recipe, epochs=1), recipe)


# -- Hugging Face Trainer -----------------------------------------------------------------
try:
    import accelerate  # noqa: F401  (the Trainer needs it)
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from mixprec.integrations.transformers import (
        PRECISION_FILE,
        MixprecTrainer,
        NumericsMonitorCallback,
    )
except ImportError:  # the [hf] extra is not installed
    MixprecTrainer = None
needs_hf = pytest.mark.skipif(MixprecTrainer is None, reason="needs mixprec[hf] (+ accelerate)")


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _hf_trainer(out, recipe, *, max_steps=4, seed=0, callbacks=(), **kwargs):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (32, 16), generator=g)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps,
        per_device_train_batch_size=8, logging_steps=2, save_steps=2, learning_rate=1e-2,
        disable_tqdm=True, seed=0, **kwargs,
    )  # fmt: skip
    return MixprecTrainer(
        model=_gpt2(seed), args=args, train_dataset=data, recipe=recipe, callbacks=list(callbacks)
    )


@needs_hf
@pytest.mark.parametrize("recipe", DONE_WHEN)
def test_hf_trainer_trains_gpt2_and_writes_the_monitor_report(tmp_path, recipe):
    from mixprec.recipes import get_recipe

    monitor = NumericsMonitorCallback(formats=["fp16", "fp8_e4m3fn"])
    trainer = _hf_trainer(tmp_path, recipe, callbacks=[monitor])
    c_attn = trainer.model.transformer.h[0].attn.c_attn.weight  # an HF Conv1D
    before = c_attn.detach().clone()
    trainer.train()
    assert c_attn.dtype == get_recipe(recipe).param_dtype
    assert not torch.equal(c_attn.detach().float(), before)  # it trained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    assert all(math.isfinite(h["loss"]) for h in logs)
    if recipe == "fp16-mixed":  # the loss scaler counted every step
        assert [h["precision/steps"] for h in logs] == [2, 4]
    assert all("precision/grad_norm" in h and "numerics/nonfinite_tensors" in h for h in logs)
    assert monitor.report_path == tmp_path / "numerics" / "numerics.json"
    report = json.loads(monitor.report_path.read_text())
    assert [s["step"] for s in report["steps"]] == [0, 1, 2, 3]
    assert (tmp_path / "checkpoint-2" / PRECISION_FILE).is_file()
    assert len(monitor.monitor.scales) == (4 if trainer.precision.scaler.enabled else 0)


@needs_hf
@pytest.mark.parametrize("recipe", ["fp16-mixed", "bf16-master", "bf16-true"])
def test_hf_resume_from_checkpoint_is_bit_exact(tmp_path, recipe):
    straight = _hf_trainer(tmp_path / "a", recipe)
    straight.train()
    resumed = _hf_trainer(tmp_path / "b", recipe, seed=123)  # another init, then the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    _assert_same(list(resumed.model.parameters()), list(straight.model.parameters()), recipe)


@needs_hf
def test_hf_trainer_refuses_accelerate_mixed_precision(tmp_path):
    with pytest.raises(ValueError, match="drop fp16/bf16"):
        _hf_trainer(tmp_path, "bf16-mixed", bf16=True)


# -- the package never needs the frameworks; the documented examples run ------------------
def test_import_mixprec_needs_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, mixprec, mixprec.integrations, mixprec.precision.metrics\n"
        "bad = [m for m in ('lightning', 'transformers', 'tensorboard', 'accelerate')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _doc_examples() -> list:
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    params = []
    for i, code in enumerate(blocks):
        marks = []
        if "lightning" in code:
            marks.append(needs_lightning)
        if "transformers" in code:
            marks.append(needs_hf)
        params.append(pytest.param(code, id=f"example{i}", marks=marks))
    return params


@pytest.mark.parametrize("code", _doc_examples())
def test_docs_examples_run(tmp_path, monkeypatch, code):
    monkeypatch.chdir(tmp_path)  # the examples write hf-out/, tb-runs/, lightning_logs/
    torch._dynamo.reset()
    exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__doc_example__"})
    assert any(tmp_path.iterdir()) or "compile" in code  # each example wrote its output


@pytest.mark.parametrize(
    "name",
    [
        "mixprec.precision.metrics",
        "mixprec.integrations.tensorboard",
        pytest.param("mixprec.integrations.lightning", marks=needs_lightning),
        pytest.param("mixprec.integrations.transformers", marks=needs_hf),
    ],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    pytest.importorskip("tensorboard")
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0, result
