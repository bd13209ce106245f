"""What ``Precision.state_dict`` holds, and the checks ``load_state_dict`` makes first.

The state is plain data::

    {"recipe": str(recipe),
     "scaler": LossScaler.state_dict(),
     "nonfinite": {"steps": int, "skipped": int, "streak": int},
     "optimizers": [{"masters": MasterWeights.state_dict() | None,
                     "compensated": CompensatedUpdate.state_dict() | None}, ...]}

:func:`check_state` validates all of it against a set-up Precision before anything is
loaded, so a state of another recipe or model is refused with nothing changed.
"""

from __future__ import annotations

import torch

from mixprec.precision.parts import OptimizerPlan

__all__ = ["REQUIRED_KEYS", "check_state", "load_plans_state", "plans_state"]

REQUIRED_KEYS = ("recipe", "scaler", "optimizers")


def _fail(message: str) -> ValueError:
    return ValueError(f"cannot load this Precision state: {message}")


def check_state(state, recipe: str, plans: list[OptimizerPlan]) -> None:
    """Raise ``TypeError`` / ``ValueError`` if ``state`` cannot be loaded; change nothing.

    Checks: a dict with the keys of ``Precision.state_dict()``, the same recipe, one entry
    per optimizer given to ``setup``, master weights of the same groups and shapes, and
    compensation buffers of the same shapes.
    """
    if not isinstance(state, dict):
        raise TypeError(
            f"Precision.load_state_dict() needs the dict Precision.state_dict() returned, "
            f"got {type(state).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise _fail(
            f"it lacks {missing} (has {sorted(map(str, state))}); expected what "
            f"Precision.state_dict() returns, with keys {list(REQUIRED_KEYS)}"
        )
    if state["recipe"] != recipe:
        raise ValueError(
            f"checkpoint was saved with recipe {state['recipe']!r}, this Precision runs "
            f"{recipe!r}"
        )
    saved_plans = state["optimizers"]
    if not isinstance(saved_plans, (list, tuple)) or len(saved_plans) != len(plans):
        count = len(saved_plans) if isinstance(saved_plans, (list, tuple)) else saved_plans
        raise ValueError(
            f"checkpoint has {count} optimizers, setup() was given {len(plans)}"
        )
    for i, (plan, saved) in enumerate(zip(plans, saved_plans, strict=True)):
        if not isinstance(saved, dict) or not {"masters", "compensated"} <= set(saved):
            raise _fail(f"optimizer {i} entry must hold 'masters' and 'compensated'")
        for key, mine in (("masters", plan.masters), ("compensated", plan.compensated)):
            if (saved[key] is None) != (mine is None):
                have = "has" if saved[key] is not None else "has no"
                raise _fail(f"optimizer {i}: the checkpoint {have} {key} state, this setup "
                            f"{'has' if mine is not None else 'has none'}")  # fmt: skip
        if plan.masters is not None:
            plan.masters.check_state_dict(saved["masters"])
        if plan.compensated is not None:
            _check_compensated(i, plan.compensated.comps, saved["compensated"])


def _check_compensated(index: int, comps: list, saved: dict) -> None:
    saved_comps = saved.get("comps") if isinstance(saved, dict) else None
    if saved_comps is None or len(saved_comps) != len(comps):
        raise _fail(
            f"optimizer {index}: the compensation state holds "
            f"{'no' if saved_comps is None else len(saved_comps)} buffers, this setup "
            f"{len(comps)}: was it saved from the same model and optimizer?"
        )
    for k, (mine, theirs) in enumerate(zip(comps, saved_comps, strict=True)):
        if (mine is None) != (theirs is None) or (
            mine is not None
            and (not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape)
        ):
            raise _fail(
                f"optimizer {index}: compensation buffer {k} has shape "
                f"{getattr(theirs, 'shape', theirs)} in the checkpoint, "
                f"{getattr(mine, 'shape', mine)} here (another model?)"
            )


def plans_state(plans) -> list[dict]:
    """The ``"optimizers"`` entry: each plan's master weights and compensation state."""
    return [
        {
            "masters": None if plan.masters is None else plan.masters.state_dict(),
            "compensated": None if plan.compensated is None else plan.compensated.state_dict(),
        }
        for plan in plans
    ]


def load_plans_state(plans, saved: list[dict]) -> None:
    """Load what :func:`plans_state` saved (checked first by :func:`check_state`)."""
    for plan, entry in zip(plans, saved, strict=True):
        if plan.masters is not None:
            plan.masters.load_state_dict(entry["masters"])
        if plan.compensated is not None:
            plan.compensated.load_state_dict(entry["compensated"])
