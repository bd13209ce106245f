"""Shared test configuration: the lists that drive every parametrized test.

The lists come from the registries themselves, so a new format or recipe is tested by
every test without editing any list here.
"""

from __future__ import annotations

import os

import pytest
import torch

from mixprec.formats import FORMATS
from mixprec.recipes import RECIPES

# Under pytest-xdist each worker gets one core's worth of threads, so two workers on a
# two-core machine do not oversubscribe it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

RECIPE_NAMES = list(RECIPES)
FORMAT_NAMES = list(FORMATS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
