"""Shared test configuration: the lists that drive every parametrized test.

The lists come from the registries themselves, so a new format or recipe is tested by
every test without editing any list here.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec.formats import FORMATS
from mixprec.recipes import recipe_names

# Under pytest-xdist each worker gets one core's worth of threads, so two workers on a
# two-core machine do not oversubscribe it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

RECIPE_NAMES = recipe_names()
FORMAT_NAMES = list(FORMATS)


class TinyNet(nn.Module):
    """n_in -> hidden (LayerNorm, ReLU) -> n_out: the smallest model with a norm layer (kept
    fp32 by the 16-bit recipes); casts its input to its own parameter dtype."""

    def __init__(self, n_in: int = 8, hidden: int = 16, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.fc1.weight.dtype)  # (B, n_in)
        return self.fc2(torch.relu(self.norm(self.fc1(x))))  # (B, n_out)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """Precision.setup sets the process-wide TF32 flags until close(): undo after each test."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


class SyncCounter(TorchDispatchMode):
    """Counts ops that copy a device value to the host (a sync on an accelerator)."""

    SYNC_OPS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.is_nonzero)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNC_OPS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))
