"""The pieces of one training step that :class:`~mixprec.precision.Precision` puts together.

The step's result (:class:`StepResult`, readable without a host sync), the autocast / TF32
contexts, the per-optimizer plan decided once in ``setup``, the loss scaler a recipe asks
for, and sync-free gradient clipping.
"""

from __future__ import annotations

import contextlib
import math

import torch

from mixprec.master import CompensatedUpdate, MasterWeights
from mixprec.recipes import Recipe
from mixprec.scaling import LossScaler

__all__ = [
    "CudaContext",
    "NoAutocast",
    "OptimizerPlan",
    "StepResult",
    "Tf32Flags",
    "build_plan",
    "check_loss",
    "check_max_grad_norm",
    "clip_grads_",
    "make_scaler",
]


class StepResult:
    """What :meth:`Precision.step` returns: whether the optimizer stepped.

    ``bool(result)`` is True when the step was taken, False when it was skipped because a
    gradient was inf/NaN. On the sync-free path the answer is still on the device
    (``result.found_inf``, a 0-dim fp32 tensor, 1.0 when skipped).

    .. warning:: ``bool(result)`` then waits for the device (one host sync). Keep the
        object and look at it later (or never) to keep the loop sync-free.

    Example:
        >>> bool(StepResult(True)), bool(StepResult(found_inf=torch.tensor(1.0)))
        (True, False)
    """

    __slots__ = ("_known", "found_inf")

    def __init__(self, stepped: bool | None = None, *, found_inf: torch.Tensor | None = None):
        self._known = stepped
        self.found_inf = found_inf

    def __bool__(self) -> bool:
        if self._known is None:
            self._known = not bool(self.found_inf.item())  # host sync, by request
        return self._known

    def __eq__(self, other) -> bool:
        if isinstance(other, (bool, StepResult)):
            return bool(self) == bool(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(bool(self))

    def __repr__(self) -> str:
        if self._known is None:
            return "StepResult(pending: bool() reads found_inf from the device)"
        return f"StepResult({self._known})"


class NoAutocast(contextlib.ContextDecorator):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class CudaContext(contextlib.ContextDecorator):
    """torch.autocast (optional) plus the recipe's TF32 flags, restored on exit."""

    def __init__(self, dtype: torch.dtype | None, allow_tf32: bool) -> None:
        self.dtype = dtype
        self.allow_tf32 = allow_tf32
        self._saved: list = []

    def __enter__(self):
        self._saved.append(
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else None,
            )
        )
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allow_tf32
        if self._saved[-1][2] is not None:
            self._saved[-1][2].__enter__()
        return self

    def __exit__(self, *exc):
        matmul, cudnn, autocast = self._saved.pop()
        if autocast is not None:
            autocast.__exit__(*exc)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        return False


class Tf32Flags:
    """The process-wide TF32 switches, set to a recipe's for a Precision's lifetime.

    ``apply`` saves the user's settings (``torch.get_float32_matmul_precision()`` and
    ``torch.backends.cudnn.allow_tf32``) the first time and sets both matmul and cuDNN
    TF32 to ``allow``; ``restore`` puts the saved settings back. The flags are global, so
    forward, backward and the optimizer step all run under them (on CUDA; on a CPU they
    are recorded but change no arithmetic).

    Example:
        >>> flags = Tf32Flags(); before = torch.backends.cudnn.allow_tf32
        >>> flags.apply(False); torch.backends.cudnn.allow_tf32
        False
        >>> flags.restore(); torch.backends.cudnn.allow_tf32 == before
        True
    """

    __slots__ = ("_saved",)

    def __init__(self) -> None:
        self._saved: tuple[str, bool] | None = None

    def apply(self, allow: bool) -> None:
        if self._saved is None:
            self._saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow

    def restore(self) -> None:
        if self._saved is not None:
            matmul, cudnn = self._saved
            torch.set_float32_matmul_precision(matmul)
            torch.backends.cudnn.allow_tf32 = cudnn
            self._saved = None


class OptimizerPlan:
    """What ``step`` does for one optimizer, decided once in ``setup``."""

    __slots__ = (
        "optimizer", "params", "names", "n_groups", "masters", "compensated", "fused",
        "last_epoch", "_model_names", "model_order",
    )  # fmt: skip

    def __init__(self, optimizer, masters, compensated, names: dict[int, str]) -> None:
        self.optimizer = optimizer
        self.masters: MasterWeights | None = masters
        self.compensated: CompensatedUpdate | None = compensated
        self._model_names = names
        self.refresh()
        self.fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.last_epoch = 0

    def refresh(self) -> None:
        """Cache the tensors whose .grad the optimizer reads (masters stand in for params)."""
        groups = self.optimizer.param_groups
        if self.masters is not None or self.compensated is not None:
            if hasattr(self, "n_groups") and len(groups) != self.n_groups:
                raise RuntimeError(
                    f"the optimizer has {len(groups)} param groups, {self.n_groups} at setup(): "
                    "with a low-precision-parameter recipe add every param group before "
                    "precision.setup(model, optimizer)"
                )
        self.n_groups = len(groups)
        self.params = [p for g in groups for p in g["params"]]
        stand_in = self.masters.low_params_by_master() if self.masters is not None else {}
        names = self._model_names
        self.names = [names.get(id(stand_in.get(id(p), p)), "?") for p in self.params]
        # clipping sums the norms in the model's parameter order, as a hand-written
        # clip_grad_norm_(model.parameters()) does (param groups may order them otherwise)
        position = {key: i for i, key in enumerate(names)}
        last = len(position)
        self.model_order = sorted(
            range(len(self.params)),
            key=lambda i: position.get(id(stand_in.get(id(self.params[i]), self.params[i])), last),
        )

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]

    def grads_in_model_order(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """``grads`` (from :meth:`grads`) reordered as the model's parameters, Nones dropped."""
        return [grads[i] for i in self.model_order if grads[i] is not None]


def build_plan(optimizer, recipe: Recipe, names: dict[int, str], seed: int) -> OptimizerPlan:
    """The :class:`OptimizerPlan` of ``optimizer`` under ``recipe``: fp32 master weights
    (master-weight recipes) or a compensated bf16 update (Kahan / stochastic rounding).

    Gradients a backward already left in the 16-bit parameters are carried into the fp32
    master gradients, so a step is the same whether the backward or this came first.
    """
    masters = compensated = None
    if recipe.master_dtype is not None:
        masters = MasterWeights(optimizer, accumulate_fp32=recipe.grad_dtype == torch.float32)
        if masters.accumulate_fp32:  # grads of a backward that ran before the hooks
            low = masters.low_params_by_master()
            with torch.no_grad():
                for master in masters.masters:
                    p = low[id(master)]
                    if p.grad is not None:
                        master.grad.add_(p.grad)
                        p.grad = None
    elif recipe.update != "plain":
        compensated = CompensatedUpdate(optimizer, method=recipe.update, seed=seed % 2**63)
    return OptimizerPlan(optimizer, masters, compensated, names)


def make_scaler(recipe: Recipe) -> LossScaler:
    if recipe.loss_scaling == "dynamic":
        return LossScaler.from_preset(recipe.scaler_preset)
    if recipe.loss_scaling == "static":
        return LossScaler.static(recipe.static_scale)
    return LossScaler.disabled()


def check_loss(loss) -> None:
    """Refuse what ``Precision.backward`` cannot back-propagate: a number, a non-scalar."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"backward() needs the loss tensor the forward pass returned, got "
            f"{type(loss).__name__} {loss!r}: a number has no graph to back-propagate"
        )
    if loss.numel() != 1:
        raise RuntimeError(
            f"backward() needs a scalar loss, got shape {tuple(loss.shape)}: reduce it "
            "first, e.g. loss.mean() or loss.sum()"
        )


def check_max_grad_norm(value) -> float | None:
    """``value`` as a float, or a ``ValueError`` / ``TypeError`` naming it.

    A negative norm would flip the gradients (``coef = max_norm / total < 0``: training
    goes uphill), NaN / inf would write NaN or nothing, zero would zero every gradient.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"max_grad_norm={value!r} must be a positive finite number or None, "
            f"got {type(value).__name__}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"max_grad_norm={value!r} must be a positive finite number (or None for no "
            "clipping): a negative value flips the gradients, nan/inf do not clip"
        )
    return float(value)


def clip_grads_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place so their total 2-norm is at most ``max_norm`` (no sync).

    ``total = sqrt(sum_i ||g_i||^2)``, ``g_i *= min(1, max_norm / (total + 1e-6))``,
    computed by torch's own ``torch.nn.utils.get_total_norm`` (norms per (device, dtype)
    group, in ``grads`` order) and the same multiply as ``clip_grads_with_norm_``, so the
    result is bit for bit that of ``torch.nn.utils.clip_grad_norm_`` over the same
    gradients. Returns ``total`` (0-dim, in the gradients' dtype as torch gives it).
    """
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6
        total = get_total_norm(grads, 2.0)
    else:  # pragma: no cover - older torch: the body of its clip_grad_norm_
        norms = [n for g in grads for n in torch._foreach_norm([g])]
        total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: dict = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), group in by_device.items():
        torch._foreach_mul_(group, coef.to(dev))  # no dtype cast: as clip_grads_with_norm_
    return total
