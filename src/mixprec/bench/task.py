"""The bench's task protocol: what a task (built-in or the user's) provides.

Built-in tasks are in :mod:`mixprec.bench.tasks`, a user's model wrapped as a task in
:mod:`mixprec.bench.user`; both subclass :class:`Task`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.formats.names import unknown

SIZES: tuple[str, ...] = ("tiny", "small", "base")
_EVAL_SEED = 1234  # evaluation sets are the same for every training seed


class Task(ABC):
    """A model, its data, its loss and its evaluation metric.

    Attributes:
        name: registry key (``"mlp"``, ...).
        size: ``"tiny"``, ``"small"`` or ``"base"``.
        seed: seed of the initial weights and of the training-data order.
        metric: key of :meth:`evaluate`'s main metric.
        higher_is_better: whether a larger metric is better.
        tolerance: largest absolute gap of the metric from fp32's still called the same.
        item_unit: ``"samples"`` or ``"tokens"``; throughput is counted in these.
        items_per_batch: items in one training batch.
        default_steps: training steps that give a meaningful metric at this size.
        lr: AdamW learning rate.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    tolerance: ClassVar[float]
    item_unit: ClassVar[str] = "samples"

    def __init__(self, size: str = "tiny", *, seed: int = 0) -> None:
        if size not in SIZES:
            raise ValueError(unknown("size", size, SIZES))
        self.size = size
        self.seed = int(seed)
        self.config = self._configs()[size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size!r}, seed={self.seed})"

    # -- per-task pieces -------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def _configs() -> dict[str, Any]: ...

    @abstractmethod
    def _make_model(self) -> nn.Module: ...

    @abstractmethod
    def _batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...

    @property
    def items_per_batch(self) -> int:
        return self.config.batch

    @property
    def default_steps(self) -> int:
        return self.config.steps

    @property
    def lr(self) -> float:
        return self.config.lr

    def within_tolerance(self, value: float, reference: float) -> bool:
        """True when ``|value - reference| <= tolerance`` (same quality as the reference)."""
        return abs(value - reference) <= self.tolerance

    @property
    def tolerance_text(self) -> str:
        """The tolerance as printed in reports, e.g. ``"0.1"``."""
        return f"{self.tolerance:g}"

    # -- the interface ---------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh fp32 model on the CPU; the same weights for the same seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._make_model()

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over ``model``'s parameters at the task's learning rate.

        The fused implementation (one kernel for all parameters) where the parameters'
        device has it (CPU and CUDA), else the default one.
        """
        params = list(model.parameters())
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        try:
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01, fused=fused)
        except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)

    def train_batches(self, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` CPU batches ``(inputs, targets)``, in the same order for the same seed."""
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(steps):
            yield self._batch(generator)

    def example_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first training batch."""
        return next(self.train_batches(1))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``outputs`` (logits, any dtype) against ``targets``, in fp32."""
        return F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The task's metrics on its fixed evaluation set (run under the caller's autocast)."""
        was_training = model.training
        model.eval()
        try:
            return self._evaluate(model, next(model.parameters()).device)
        finally:
            model.train(was_training)
