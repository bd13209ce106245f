"""Bring your own model: the ``package.module:factory`` protocol of ``mixprec bench``/``diagnose``.

The factory takes no arguments and returns four things::

    def factory():
        model = MyNet()                                        # nn.Module, fp32, on the CPU
        optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)  # params -> Optimizer
        batches = [(x, y) for x, y in my_loader]               # iterable of (inputs, targets)
        loss_fn = torch.nn.functional.cross_entropy            # (outputs, targets) -> scalar
        return model, optimizer_factory, batches, loss_fn

* ``model`` is an ``nn.Module`` in fp32; the bench copies its initial weights, so every recipe
  starts from the same ones.
* ``optimizer_factory(params)`` returns a ``torch.optim.Optimizer`` over ``params``
  (``model.parameters()``).
* ``batches`` is any iterable (list, generator, DataLoader) of ``(inputs, targets)``; the
  bench reads the first ``steps`` once and replays them (cyclically, if there are fewer)
  for every recipe, so all recipes see the same data in the same order. ``inputs`` is a
  tensor (``model(inputs)``), a tuple or list of tensors (``model(*inputs)``) or a dict of
  tensors (``model(**inputs)``); ``targets`` is whatever ``loss_fn`` accepts.
* ``loss_fn(outputs, targets)`` returns a scalar tensor.

The bench evaluates a user model by its mean loss on the first (up to 4) batches, named
``loss``, and calls a recipe the same quality as fp32 when that loss is within 5% of fp32's
(there is no held-out set in the protocol). Torch is seeded with the bench's seed before
the factory is called. ``module`` is imported with the current directory at the end of
``sys.path`` (after the installed packages) while it is imported and the factory called.

Example:
    >>> task = load_user_task("mixprec.bench.user:example_factory")
    >>> task.metric, task.items_per_batch
    ('loss', 16)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mixprec.bench.task import Task
from mixprec.memory.calls import call_model  # the one way a user's model is called

__all__ = ["PROTOCOL", "UserTask", "call_model", "example_factory", "load_user_task", "to_device"]

PROTOCOL = (
    "factory() must take no arguments and return (model, optimizer_factory, batches, loss_fn): "
    "an nn.Module, a callable params -> torch.optim.Optimizer, an iterable of "
    "(inputs, targets) and a callable (outputs, targets) -> scalar tensor"
)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 1


class UserTask(Task):
    """A user model behind the :class:`~mixprec.bench.tasks.Task` interface."""

    name = "user"
    description = "user model from package.module:factory; loss on the first batches"
    metric = "loss"
    higher_is_better = False
    tolerance = 0.05  # relative: within 5% of fp32's loss

    def __init__(self, spec: str, parts: tuple, *, seed: int = 0) -> None:
        self.spec, self.size, self.seed, self.config = spec, "user", int(seed), None
        model, self._optimizer_factory, batches, self._loss_fn = parts
        self._initial = copy.deepcopy(model.state_dict())
        self._model = model
        self._source: Iterator = iter(batches)
        self._cache: list = []
        first = self._take(1)
        if not first:
            raise ValueError(f"{spec}: batches is empty; {PROTOCOL}")
        if not (isinstance(first[0], (tuple, list)) and len(first[0]) == 2):
            raise ValueError(
                f"{spec}: each batch must be a pair (inputs, targets), got "
                f"{type(first[0]).__name__}; {PROTOCOL}"
            )

    def __repr__(self) -> str:
        return f"UserTask({self.spec!r}, seed={self.seed})"

    def _take(self, n: int) -> list:
        while len(self._cache) < n:
            batch = next(self._source, None)
            if batch is None:
                break
            self._cache.append(batch)
        return self._cache[:n]

    # Task's abstract pieces are not used by a user task.
    _configs = staticmethod(lambda: {})
    _make_model = _batch = _evaluate = None  # type: ignore[assignment]

    @property
    def items_per_batch(self) -> int:
        return _batch_size(self._cache[0][0])

    @property
    def default_steps(self) -> int:
        return 50

    @property
    def lr(self) -> float:
        return float("nan")

    def within_tolerance(self, value: float, reference: float) -> bool:
        """True when ``|value - reference| <= 5% of |reference|``."""
        return abs(value - reference) <= self.tolerance * abs(reference)

    @property
    def tolerance_text(self) -> str:
        return f"{self.tolerance:.0%} of fp32"

    def build_model(self) -> nn.Module:
        model = copy.deepcopy(self._model)
        model.load_state_dict(self._initial)
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        opt = self._optimizer_factory(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"{self.spec}: optimizer_factory(params) returned {type(opt).__name__}, "
                f"not a torch.optim.Optimizer; {PROTOCOL}"
            )
        return opt

    def train_batches(self, steps: int) -> Iterator[tuple[Any, Any]]:
        """The first ``steps`` batches (cyclically when there are fewer), read from the
        user's iterable as training consumes them and kept for the next recipe."""
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        return itertools.islice(self._replay(), steps)

    def _replay(self) -> Iterator[tuple[Any, Any]]:
        i = 0
        while True:
            if i == len(self._cache) and not self._take(i + 1)[i:]:
                break
            yield self._cache[i]
            i += 1
        while self._cache:  # fewer batches than steps: start over
            yield from self._cache

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        loss = self._loss_fn(outputs, targets)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise TypeError(f"{self.spec}: loss_fn must return a scalar tensor; {PROTOCOL}")
        return loss.float().reshape(())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """loss: mean of ``loss_fn`` over the first (up to 4) batches, model in eval mode."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            batches = self._take(4)
            total = sum(
                self.loss(call_model(model, to_device(x, device)), to_device(y, device)).item()
                for x, y in batches
            )
        finally:
            model.train(was_training)
        return {"loss": total / len(batches)}


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on ``sys.path`` inside the block only.

    It goes after the installed packages (a ``./matplotlib.py`` never shadows matplotlib)
    and ``sys.path`` is restored afterwards, so later imports (the report's plots) never
    pick up files from the current directory.
    """
    saved = list(sys.path)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_factory(spec: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model {spec!r} must be written package.module:factory")
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except Exception as exc:
        # Boundary, broad on purpose: importing the user's module runs their code, which
        # may raise anything (SyntaxError, ImportError, ...). Re-raised with type and message.
        raise ValueError(
            f"cannot import module {module_name!r} of {spec!r} ({type(exc).__name__}: {exc}); "
            "it must be importable from the current directory or sys.path"
        ) from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}; {PROTOCOL}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{spec} is a {type(factory).__name__}, not callable; {PROTOCOL}")
    return factory


def load_user_task(spec: str, *, seed: int = 0) -> UserTask:
    """Import ``package.module:factory``, call it and check what it returns.

    Raises:
        ValueError: the module does not import, the factory is missing, fails or returns
            something other than the protocol (the message states the protocol).

    Example:
        >>> type(load_user_task("mixprec.bench.user:example_factory").build_model()).__name__
        'Sequential'
    """
    factory = _import_factory(spec)
    with torch.random.fork_rng(devices=[]), _cwd_importable():
        torch.manual_seed(seed)
        try:
            parts = factory()
        except Exception as exc:  # boundary: the user's factory; re-raised with type, message
            raise ValueError(f"calling {spec}() failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(parts, (tuple, list)) or len(parts) != 4:
        got = f"{len(parts)} items" if isinstance(parts, (tuple, list)) else type(parts).__name__
        raise ValueError(f"{spec} returned {got}; {PROTOCOL}")
    model, optimizer_factory, batches, loss_fn = parts
    checks = (
        (isinstance(model, nn.Module), "model", model),
        (callable(optimizer_factory), "optimizer_factory", optimizer_factory),
        (isinstance(batches, Iterable), "batches", batches),
        (callable(loss_fn), "loss_fn", loss_fn),
    )
    for ok, what, value in checks:
        if not ok:
            raise ValueError(f"{spec}: {what} is a {type(value).__name__}; {PROTOCOL}")
    return UserTask(spec, tuple(parts), seed=seed)


def example_factory():
    """A protocol example: a small regression MLP on random data (used by the docs and tests)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    batches = [
        (torch.randn(16, 16, generator=g), torch.randn(16, 1, generator=g)) for _ in range(8)
    ]
    optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    return model, optimizer_factory, batches, nn.functional.mse_loss
