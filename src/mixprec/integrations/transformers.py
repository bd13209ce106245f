"""Hugging Face ``Trainer``: train with any mixprec recipe by changing two lines.

>>> from mixprec.integrations.transformers import MixprecTrainer, NumericsMonitorCallback
>>> trainer = MixprecTrainer(                                          # doctest: +SKIP
...     model=model, args=args, train_dataset=train,
...     recipe="bf16-master",                      # was: TrainingArguments(bf16=True)
...     callbacks=[NumericsMonitorCallback(every=10)],
... )
>>> trainer.train()                                                    # doctest: +SKIP

:class:`MixprecTrainer` is a ``transformers.Trainer`` whose training step runs on a
:class:`mixprec.Precision`, through the Trainer's own extension points:

===============================================  ==========================================
Trainer                                          mixprec
===============================================  ==========================================
``create_optimizer``                             ``Precision.setup(model, optimizer)``; the
                                                 Trainer then holds an optimizer whose
                                                 ``step()`` is ``Precision.step``
``autocast_smart_context_manager``               ``Precision.autocast()``
``accelerator.backward``                         ``Precision.backward(loss / accumulation)``
``args.max_grad_norm``                           clipping inside ``Precision.step``, on the
                                                 unscaled fp32 gradients
``_save/_load_optimizer_and_scheduler``          ``mixprec_precision.pt`` in each checkpoint
                                                 (loss scale, master weights, compensation
                                                 buffers): a resume is bit-exact
``log``                                          adds ``precision.metrics()`` to the logs,
                                                 so every ``report_to`` backend gets them
===============================================  ==========================================

Needs ``pip install mixprec[hf]`` (``transformers`` and ``accelerate``, which the Trainer needs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mixprec.integrations.transformers needs the 'transformers' package: "
        "pip install 'mixprec[hf]'"
    ) from err

import torch

from mixprec.integrations.monitor_session import MonitorSession
from mixprec.numerics.monitor import DEFAULT_FORMATS, TRACK
from mixprec.precision import Precision
from mixprec.recipes import Recipe, get_recipe

__all__ = ["PRECISION_FILE", "MixprecTrainer", "NumericsMonitorCallback"]

PRECISION_FILE = "mixprec_precision.pt"  # the Precision's state, in each checkpoint folder


class _PrecisionOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer holds: ``step()`` is ``Precision.step`` on the real one.

    Shares (does not copy) the real optimizer's ``param_groups``, ``state`` and
    ``defaults``, so learning-rate schedulers and checkpoints see the real optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision, max_grad_norm):
        # no Optimizer.__init__: nothing of its own to build, everything is the real one's
        self.optimizer = optimizer
        self.precision = precision
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self.last_step = None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        if closure is not None:
            raise TypeError("the mixprec optimizer step takes no closure")
        self.last_step = self.precision.step(self.optimizer, max_grad_norm=self.max_grad_norm)
        return self.last_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"PrecisionOptimizer({self.precision.recipe}, {self.optimizer!r})"


class MixprecTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a mixprec recipe.

    Args:
        recipe: a recipe name (``"bf16-true"``), ``key=value`` string or :class:`Recipe`.
        precision: a ready :class:`mixprec.Precision` instead (e.g. with a custom scaler).
        *args, **kwargs: as for ``Trainer``. ``TrainingArguments(fp16=True / bf16=True)``
            is refused: the recipe decides the precision.

    Attributes:
        precision: the :class:`mixprec.Precision` doing the work.
    """

    def __init__(self, *args, recipe: str | Recipe = "bf16-mixed", precision=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.fp16 or self.args.bf16:
            raise ValueError(
                f"TrainingArguments(fp16={self.args.fp16}, bf16={self.args.bf16}) turns on "
                "accelerate's own mixed precision; with MixprecTrainer the recipe decides: "
                "drop fp16/bf16 from the TrainingArguments and pass recipe=..."
            )
        self.precision = precision if precision is not None else Precision(get_recipe(recipe))
        # The Trainer calls self.accelerator.backward(loss): route it through the Precision.
        self.accelerator.backward = self._backward

    def _backward(self, loss: torch.Tensor, **kwargs) -> None:
        kwargs.pop("learning_rate", None)
        if kwargs.pop("scale_wrt_gas", True):  # as accelerate's backward
            loss = loss / self.accelerator.gradient_accumulation_steps
        self.precision.backward(loss, **kwargs)

    def create_optimizer(self, model=None):
        super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(self.optimizer, _PrecisionOptimizer):
            self.precision.setup(self.model, self.optimizer)
            self.optimizer = _PrecisionOptimizer(
                self.optimizer, self.precision, self.args.max_grad_norm
            )
        return self.optimizer

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        return self.precision.autocast()

    # Clipping happens inside Precision.step (after unscaling, on the fp32 gradients); the
    # Trainer's own clip would see scaled 16-bit gradients. The norm is logged by log().
    def _clip_grad_norm(self, model):
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    # -- checkpoints ------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.precision.state_dict(), os.path.join(output_dir, PRECISION_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, PRECISION_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not saved by MixprecTrainer, so the "
                "loss scale and master weights cannot be restored (the resume would not be "
                "bit-exact)"
            )
        self.precision.load_state_dict(torch.load(path, weights_only=False))

    # -- logging ----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs, not evaluation ones
            callbacks = self.callback_handler.callbacks
            cb = next((c for c in callbacks if isinstance(c, NumericsMonitorCallback)), None)
            monitor, layers = (cb.monitor, cb.log_layers) if cb is not None else (None, False)
            logs = {**logs, **self.precision.metrics(monitor, layers=layers)}
        super().log(logs, *args, **kwargs)


class NumericsMonitorCallback(TrainerCallback):
    """Run :class:`mixprec.numerics.Monitor` during ``train()``; write its report.

    At the end of training it writes ``numerics.json`` (everything measured,
    :func:`mixprec.numerics.report.write_json`) into ``out_dir``. Under
    :class:`MixprecTrainer` the monitor's per-layer summaries also go into the Trainer's
    logs (see :mod:`mixprec.precision.metrics`).

    Args:
        formats, every, track: passed to :class:`mixprec.numerics.Monitor`.
        out_dir: where the report goes; ``None``: ``<args.output_dir>/numerics``.
        log_layers: put every measured tensor's summary into the Trainer's logs (four or
            more numbers per tensor, printed with the loss); by default only
            ``numerics/step`` and ``numerics/nonfinite_tensors``.

    Attributes:
        monitor, report_path: the run's :class:`~mixprec.numerics.Monitor` and, after
            ``train()`` (on the main process), the path of its ``numerics.json``; both held
            by ``session`` (:class:`~mixprec.integrations.monitor_session.MonitorSession`).
    """

    def __init__(
        self,
        *,
        formats: Iterable[str] = DEFAULT_FORMATS,
        every: int = 1,
        track: Iterable[str] = TRACK,
        out_dir: str | Path | None = None,
        log_layers: bool = False,
    ) -> None:
        self.session = MonitorSession(formats, every, track, out_dir)
        self.log_layers = log_layers

    monitor = property(lambda self: self.session.monitor, doc="the session's monitor")
    report_path = property(lambda self: self.session.report_path, doc="its numerics.json")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.session.start(model)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        while optimizer is not None and not isinstance(optimizer, _PrecisionOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)  # accelerate's wrapper
        self.session.step(optimizer.precision if optimizer is not None else None)

    def on_train_end(self, args, state, control, **kwargs):
        default = Path(args.output_dir) / "numerics"
        self.session.finish(default, main_process=state.is_world_process_zero)
