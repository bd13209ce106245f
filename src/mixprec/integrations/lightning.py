"""Lightning: every mixprec recipe as a precision plugin, and the numerics monitor as a Callback.

>>> import lightning as L                                              # doctest: +SKIP
>>> from mixprec.integrations.lightning import MixprecPrecision, NumericsMonitor
>>> trainer = L.Trainer(plugins=[MixprecPrecision("bf16-true")],      # doctest: +SKIP
...                     callbacks=[NumericsMonitor(every=10)])
>>> fabric = L.Fabric(plugins=[MixprecPrecision("fp8-mixed")])        # doctest: +SKIP

:class:`MixprecPrecision` implements Lightning's ``Precision`` interface (Trainer and Fabric)
on a :class:`mixprec.Precision`, so it brings what Lightning's own plugins lack: fp32 master
weights of 16-bit parameters (``fp16-master``, ``bf16-master``), ``bf16-true`` with Kahan
summation or stochastic rounding, and fp8 Linear layers without TransformerEngine. Its state
(loss scale, master weights, compensation buffers) is saved in Lightning checkpoints and
restored on resume, bit-exactly.

Where each Lightning hook goes:

=======================  ===========================================================
Lightning                mixprec
=======================  ===========================================================
``connect`` (Trainer)    ``Precision.setup(model, optimizers)``
``convert_module``       Fabric: ``Precision.setup(module, [])``; the optimizer is added
                         at its first step (:meth:`mixprec.Precision.add_optimizer`)
``forward_context``      ``Precision.autocast()``
``backward``             ``Precision.backward(loss)`` (scales the loss)
``optimizer_step``       ``Precision.step(optimizer, max_grad_norm=...)`` (unscale, check,
                         clip, step or skip); ``Trainer(gradient_clip_val=c)`` clips by norm
``state_dict``           ``Precision.state_dict()``
=======================  ===========================================================

Needs ``pip install mixprec[lightning]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import Precision as _LightningPrecision
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mixprec.integrations.lightning needs the 'lightning' package: "
        "pip install 'mixprec[lightning]'"
    ) from err

import torch
from torch import nn

from mixprec.integrations.monitor_session import MonitorSession
from mixprec.numerics.monitor import DEFAULT_FORMATS, TRACK
from mixprec.precision import Precision
from mixprec.recipes import Recipe, get_recipe

__all__ = ["MixprecPrecision", "NumericsMonitor"]

# The name Lightning shows for a precision (trainer.precision), by where parameters live.
_LIGHTNING_NAME = {
    (torch.float32, None): "32-true",
    (torch.float32, torch.float16): "16-mixed",
    (torch.float32, torch.bfloat16): "bf16-mixed",
    (torch.float16, torch.float16): "16-true",
    (torch.bfloat16, torch.bfloat16): "bf16-true",
}


class MixprecPrecision(_LightningPrecision):
    """A Lightning precision plugin that trains with a mixprec recipe.

    Args:
        recipe: a recipe name (``"bf16-master"``), ``key=value`` string or :class:`Recipe`.
        max_grad_norm: clip the unscaled gradients' total 2-norm to this at every step
            (``Trainer(gradient_clip_val=...)`` does the same and wins when set).
        scaler, seed: passed to :class:`mixprec.Precision`.

    Attributes:
        mixprec: the :class:`mixprec.Precision` doing the work (``.metrics()``, ``.scaler``).
        last_step: what the last ``Precision.step`` returned (truthy when it stepped).
    """

    def __init__(
        self,
        recipe: str | Recipe = "bf16-mixed",
        *,
        max_grad_norm: float | None = None,
        scaler=None,
        seed: int | None = None,
    ) -> None:
        self.mixprec = Precision(get_recipe(recipe), scaler=scaler, seed=seed)
        r = self.mixprec.recipe
        self.precision = _LIGHTNING_NAME.get((r.param_dtype, r.compute_dtype), "32-true")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be positive or None")
        self.max_grad_norm = max_grad_norm
        self._module: nn.Module | None = None
        self._optimizers: set[int] = set()  # ids of the optimizers set up so far
        self._clip: float | None = None
        self.last_step = None

    # -- setup ----------------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        if isinstance(module, pl.LightningModule):
            return module  # Trainer: connect() sets up the model with its optimizers
        return self._setup(module, [])  # Fabric: the optimizers come at their first step

    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list):
        self._setup(model, list(optimizers))
        return model, optimizers, lr_schedulers

    def _setup(self, module: nn.Module, optimizers: list) -> nn.Module:
        if self._module is None:
            self.mixprec.setup(module, optimizers)
            self._optimizers.update(id(opt) for opt in optimizers)
            self._module = module
        elif module is not self._module:
            raise RuntimeError(
                "this MixprecPrecision already set up another model; give each Trainer / "
                "Fabric its own plugin instance"
            )
        else:  # fit() again, or validate() then fit(): only new optimizers
            for opt in optimizers:
                self._add(opt)
        return module

    def _add(self, optimizer) -> None:
        if id(optimizer) not in self._optimizers:
            self.mixprec.add_optimizer(optimizer)
            self._optimizers.add(id(optimizer))

    # -- forward / backward -----------------------------------------------------------------
    def forward_context(self):
        return self.mixprec.autocast()

    def pre_backward(self, tensor: torch.Tensor, module):
        if isinstance(module, pl.LightningModule):  # Trainer: callbacks' on_before_backward
            return super().pre_backward(tensor, module)
        return tensor

    def backward(self, tensor: torch.Tensor, model, *args: Any, **kwargs: Any) -> None:
        if isinstance(model, pl.LightningModule):  # the module's own backward hook runs it
            args = args[1:]  # Trainer passes the optimizer first

            def run(scaled: torch.Tensor) -> None:
                model.backward(scaled, *args, **kwargs)

            self.mixprec.backward(tensor, backward_fn=run)
            return
        if args:
            raise TypeError(
                f"MixprecPrecision.backward() takes keyword arguments for Tensor.backward "
                f"only, got {len(args)} positional"
            )
        self.mixprec.backward(tensor, **kwargs)

    def post_backward(self, tensor: torch.Tensor, module):
        if isinstance(module, pl.LightningModule):
            return super().post_backward(tensor, module)
        return tensor

    # -- step ---------------------------------------------------------------------------------
    def optimizer_step(self, optimizer, model=None, closure=None, **kwargs: Any):
        if kwargs:
            raise TypeError(f"optimizer_step() got unsupported arguments {sorted(kwargs)}")
        if isinstance(model, pl.LightningModule):  # Trainer: the closure runs the backward
            self._clip = None
            closure_result = closure()
            self._after_closure(model, optimizer)  # on_before_optimizer_step, clipping
            if closure_result is None and model.automatic_optimization:
                return None  # training_step returned None: no backward, no step
        self._add(optimizer)  # Fabric: first step of this optimizer
        clip = self._clip if self._clip is not None else self.max_grad_norm
        self.last_step = self.mixprec.step(optimizer, max_grad_norm=clip)
        return self.last_step

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None) -> None:
        if not clip_val or clip_val <= 0:
            return
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
        if algorithm not in (None, "norm"):
            raise ValueError(
                f"gradient_clip_algorithm={algorithm!r} is not supported by MixprecPrecision "
                "(it clips inside Precision.step, after unscaling); use 'norm'"
            )
        self._clip = float(clip_val)  # applied by Precision.step to the unscaled gradients

    def unscale_gradients(self, optimizer) -> None:
        raise RuntimeError(
            "MixprecPrecision unscales and clips inside Precision.step: pass "
            "MixprecPrecision(recipe, max_grad_norm=...) instead of fabric.clip_gradients()"
        )

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"mixprec": self.mixprec.state_dict()} if self._module is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "mixprec" not in state_dict:
            raise KeyError(
                f"no 'mixprec' entry in the precision state of this checkpoint (keys: "
                f"{sorted(state_dict)}); was it saved with MixprecPrecision?"
            )
        self.mixprec.load_state_dict(state_dict["mixprec"])


class NumericsMonitor(Callback):
    """Run :class:`mixprec.numerics.Monitor` during ``fit`` and log precision metrics.

    Every ``log_every_n_steps`` (the Trainer's) optimizer steps the callback sends
    ``precision.metrics(monitor)`` (names and formulas in :mod:`mixprec.precision.metrics`;
    without a :class:`MixprecPrecision` plugin only the ``numerics/...`` entries) to the
    Trainer's loggers. At the end of ``fit`` it writes ``numerics.json`` (everything
    measured, :func:`mixprec.numerics.report.write_json`) into ``out_dir``.

    Args:
        formats, every, track: passed to :class:`mixprec.numerics.Monitor`.
        out_dir: where the report goes; ``None``: ``<trainer.default_root_dir>/numerics``.
        log_metrics: send the metrics to the loggers.

    Attributes:
        monitor: the :class:`~mixprec.numerics.Monitor` of the ``fit`` (None before it).
        report_path: the ``numerics.json`` written when ``fit`` ended (global rank 0).
        session: the :class:`~mixprec.integrations.monitor_session.MonitorSession` that
            holds both.
    """

    def __init__(
        self,
        *,
        formats: Iterable[str] = DEFAULT_FORMATS,
        every: int = 1,
        track: Iterable[str] = TRACK,
        out_dir: str | Path | None = None,
        log_metrics: bool = True,
    ) -> None:
        self.session = MonitorSession(formats, every, track, out_dir)
        self.log_metrics = log_metrics
        self._last_global_step = 0

    monitor = property(lambda self: self.session.monitor, doc="the session's monitor")
    report_path = property(lambda self: self.session.report_path, doc="its numerics.json")

    def on_train_start(self, trainer, pl_module) -> None:
        self.session.start(pl_module)
        self._last_global_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None or trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_global_step = trainer.global_step
        precision = _precision_of(trainer)
        self.session.step(precision)
        if self.log_metrics and trainer.global_step % trainer.log_every_n_steps == 0:
            metrics = self.session.metrics(precision)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        default = Path(trainer.default_root_dir) / "numerics"
        self.session.finish(default, main_process=trainer.is_global_zero)


def _precision_of(trainer) -> Precision | None:
    """The :class:`mixprec.Precision` the Trainer trains with (None: not a mixprec plugin)."""
    plugin = trainer.precision_plugin
    return plugin.mixprec if isinstance(plugin, MixprecPrecision) else None
