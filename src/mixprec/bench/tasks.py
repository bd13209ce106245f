"""Built-in bench tasks: a model, its data, its loss and its evaluation metric, all offline.

=====  ====================================================  ==========  =================
task   model and data                                         metric      tolerance vs fp32
=====  ====================================================  ==========  =================
mlp    MLP on scikit-learn's handwritten digits (8x8, 1797)   accuracy    0.03 (absolute)
unet   UNet segmenting generated circles and rectangles       iou         0.05 (absolute)
gpt    byte-level GPT on the Python standard library source   val_loss    0.10 nats
bert   encoder classifying "which marker token is commonest"  accuracy    0.05 (absolute)
=====  ====================================================  ==========  =================

The tolerance is the largest gap of a recipe's final metric from fp32's, after the same
number of steps from the same weights on the same batches, that the bench still calls
"same quality" (it allows for the run-to-run noise of a short training run).

Every task has three sizes: ``tiny`` (tests, under a second a step on any CPU), ``small``
(this CPU; the ``gpt`` task is 3.4 M parameters at sequence 256) and ``base`` (a GPU).

Determinism: for one ``seed``, :meth:`Task.build_model` returns the same weights and
:meth:`Task.train_batches` the same batches in the same order, every call; the evaluation
data and the digits/stdlib train/validation splits are fixed and do not depend on the seed.

User models follow a small protocol; see :mod:`mixprec.bench.user`
(``get_task("package.module:factory")``).

Example:
    >>> task = get_task("mlp", "tiny")
    >>> model = task.build_model()
    >>> opt = task.build_optimizer(model)
    >>> for x, y in task.train_batches(3):
    ...     loss = task.loss(model(x), y)
    ...     loss.backward(); opt.step(); opt.zero_grad()
    >>> sorted(task.evaluate(model))
    ['accuracy']
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.bench.data import digits, make_marker_sequences, make_shapes, stdlib_corpus
from mixprec.bench.models import GPT, MLP, Encoder, TransformerConfig, UNet
from mixprec.bench.task import _EVAL_SEED, SIZES, Task
from mixprec.bench.user import load_user_task
from mixprec.formats.names import unknown

__all__ = ["SIZES", "TASKS", "Batches", "Task", "get_task", "task_descriptions"]

Size = Literal["tiny", "small", "base"]
# -- mlp: scikit-learn's handwritten digits ------------------------------------------------
@dataclass(frozen=True, slots=True)
class _MLPConfig:
    hidden: tuple[int, ...]
    batch: int
    steps: int
    lr: float


class MLPTask(Task):
    name = "mlp"
    description = "MLP (64-hidden-10) on scikit-learn's 8x8 handwritten digits; accuracy"
    metric = "accuracy"
    higher_is_better = True
    tolerance = 0.03

    @staticmethod
    def _configs() -> dict[str, _MLPConfig]:
        return {
            "tiny": _MLPConfig(hidden=(64,), batch=32, steps=100, lr=3e-3),
            "small": _MLPConfig(hidden=(256,), batch=64, steps=300, lr=1e-3),
            "base": _MLPConfig(hidden=(1024, 1024), batch=128, steps=500, lr=1e-3),
        }

    def _make_model(self) -> nn.Module:
        return MLP(64, list(self.config.hidden), 10)

    def _batch(self, generator):
        x, y, _, _ = digits()
        idx = torch.randint(len(x), (self.config.batch,), generator=generator)
        return x[idx], y[idx]

    def _evaluate(self, model, device):
        _, _, x, y = digits()
        pred = model(x.to(device)).argmax(dim=-1).cpu()
        return {"accuracy": (pred == y).float().mean().item()}


# -- unet: generated shapes -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _UNetConfig:
    image: int
    channels: int
    batch: int
    steps: int
    lr: float


class UNetTask(Task):
    name = "unet"
    description = "UNet segmenting generated circles and rectangles in noise; IoU"
    metric = "iou"
    higher_is_better = True
    tolerance = 0.05

    @staticmethod
    def _configs() -> dict[str, _UNetConfig]:
        return {
            "tiny": _UNetConfig(image=16, channels=8, batch=8, steps=100, lr=1e-2),
            "small": _UNetConfig(image=32, channels=16, batch=16, steps=200, lr=5e-3),
            "base": _UNetConfig(image=64, channels=32, batch=16, steps=500, lr=2e-3),
        }

    def _make_model(self) -> nn.Module:
        return UNet(self.config.channels)

    def _batch(self, generator):
        return make_shapes(self.config.batch, self.config.image, generator)

    def loss(self, outputs, targets):
        """Binary cross-entropy of the mask logits, in fp32."""
        return F.binary_cross_entropy_with_logits(outputs.float(), targets)

    @functools.cached_property
    def _eval_set(self):
        return make_shapes(128, self.config.image, torch.Generator().manual_seed(_EVAL_SEED))

    def _evaluate(self, model, device):
        """IoU = |pred AND mask| / |pred OR mask| over every pixel of the set, pred = logit > 0."""
        x, mask = self._eval_set
        pred = torch.cat([model(chunk.to(device)).float().cpu() > 0 for chunk in x.split(32)])
        truth = mask > 0.5
        union = (pred | truth).sum().item()
        return {"iou": (pred & truth).sum().item() / max(union, 1)}


# -- gpt: the Python standard library's source ----------------------------------------------
@dataclass(frozen=True, slots=True)
class _GPTConfig:
    model: TransformerConfig
    batch: int
    corpus_bytes: int
    eval_windows: int
    steps: int
    lr: float


class GPTTask(Task):
    name = "gpt"
    description = "byte-level GPT on the Python standard library's source; validation loss"
    metric = "val_loss"
    higher_is_better = False
    tolerance = 0.10
    item_unit = "tokens"

    @staticmethod
    def _configs() -> dict[str, _GPTConfig]:
        cfg = functools.partial(TransformerConfig, 256)
        return {
            "tiny": _GPTConfig(cfg(64, 2, 2, 64), 8, 256 * 1024, 16, 100, 3e-3),
            "small": _GPTConfig(cfg(256, 4, 4, 256), 16, 4 * 1024**2, 64, 200, 1e-3),
            "base": _GPTConfig(cfg(256, 6, 6, 384), 32, 16 * 1024**2, 128, 2000, 1e-3),
        }

    @property
    def items_per_batch(self) -> int:
        return self.config.batch * self.config.model.seq_len

    @functools.cached_property
    def _splits(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.frombuffer(
            bytearray(stdlib_corpus(self.config.corpus_bytes)), dtype=torch.uint8
        )
        cut = int(0.9 * len(data))  # last 10% of the corpus is the validation split
        return data[:cut], data[cut:]

    def _make_model(self) -> nn.Module:
        return GPT(self.config.model)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor):
        t = self.config.model.seq_len
        idx = starts.view(-1, 1) + torch.arange(t + 1)
        chunk = data[idx].long()  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def _batch(self, generator):
        train, _ = self._splits
        high = len(train) - self.config.model.seq_len - 1
        return self._windows(train, torch.randint(high, (self.config.batch,), generator=generator))

    def _evaluate(self, model, device):
        """val_loss: mean next-byte cross-entropy (nats) over evenly spaced validation windows."""
        _, val = self._splits
        high = len(val) - self.config.model.seq_len - 1
        starts = torch.linspace(0, high, self.config.eval_windows).long()
        total = 0.0
        for chunk in starts.split(self.config.batch):
            x, y = self._windows(val, chunk)
            total += self.loss(model(x.to(device)), y.to(device)).item() * len(chunk)
        return {"val_loss": total / len(starts)}


# -- bert: which marker token is commonest --------------------------------------------------
@dataclass(frozen=True, slots=True)
class _BertConfig:
    model: TransformerConfig
    batch: int
    steps: int
    lr: float


class BertTask(Task):
    name = "bert"
    description = "BERT-style encoder: which of 4 marker tokens is commonest; accuracy"
    metric = "accuracy"
    higher_is_better = True
    tolerance = 0.05

    @staticmethod
    def _configs() -> dict[str, _BertConfig]:
        cfg = functools.partial(TransformerConfig, 64, classes=4)
        return {
            "tiny": _BertConfig(cfg(32, n_layer=2, n_head=2, d_model=32), 32, 150, 3e-3),
            "small": _BertConfig(cfg(64, n_layer=4, n_head=4, d_model=128), 32, 300, 1e-3),
            "base": _BertConfig(cfg(128, n_layer=4, n_head=8, d_model=256), 64, 1000, 5e-4),
        }

    def _make_model(self) -> nn.Module:
        return Encoder(self.config.model)

    def _sequences(self, n: int, generator: torch.Generator):
        m = self.config.model
        return make_marker_sequences(n, m.seq_len, m.vocab_size, generator, m.classes)

    def _batch(self, generator):
        return self._sequences(self.config.batch, generator)

    @functools.cached_property
    def _eval_set(self):
        return self._sequences(512, torch.Generator().manual_seed(_EVAL_SEED))

    def _evaluate(self, model, device):
        x, y = self._eval_set
        pred = torch.cat([model(chunk.to(device)).argmax(-1).cpu() for chunk in x.split(128)])
        return {"accuracy": (pred == y).float().mean().item()}


class Batches:
    """A task's ``steps`` training batches, produced as they are consumed.

    Each iteration calls :meth:`Task.train_batches` afresh, which gives the same batches in
    the same order for the same seed, so every recipe sees the same data while no list of
    every batch is held (``--steps 100000000`` needs no memory up front). ``len()`` is
    ``steps``; ``batches[i]`` and ``batches[:n]`` read from the start.

    Example:
        >>> b = Batches(get_task("mlp", "tiny"), 10**8)
        >>> len(b), torch.equal(b[0][0], next(iter(b))[0])
        (100000000, True)
    """

    def __init__(self, task: Task, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        self.task, self.steps = task, int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        return iter(self.task.train_batches(self.steps))

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            if (index.start or 0) < 0 or (index.stop or 0) < 0 or index.step not in (None, 1):
                raise ValueError(f"Batches supports [start:stop] from the front, got {index}")
            return list(itertools.islice(iter(self), index.start, index.stop))
        if not 0 <= index < self.steps:
            raise IndexError(f"batch {index} of {self.steps}")
        return next(itertools.islice(iter(self), index, None))


_TASK_CLASSES: dict[str, type[Task]] = {c.name: c for c in (MLPTask, UNetTask, GPTTask, BertTask)}
TASKS: tuple[str, ...] = tuple(_TASK_CLASSES)


def task_descriptions() -> dict[str, str]:
    """Each built-in task's name and one-line description, as ``--list`` prints them.

    Example:
        >>> list(task_descriptions())
        ['mlp', 'unet', 'gpt', 'bert']
    """
    return {name: cls.description for name, cls in _TASK_CLASSES.items()}


def get_task(name: str, size: str = "tiny", *, seed: int = 0) -> Task:
    """A built-in task by name, or a user model as ``"package.module:factory"``.

    Raises:
        ValueError: unknown task (the message lists them) or size.

    Example:
        >>> get_task("gpt", "small").items_per_batch
        4096
    """
    if ":" in name:
        return load_user_task(name, seed=seed)
    if name not in _TASK_CLASSES:
        raise ValueError(
            unknown("task", name, TASKS, "(or a user model as package.module:factory)")
        )
    return _TASK_CLASSES[name](size, seed=seed)
