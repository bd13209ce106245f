"""The numerics monitor: hooks that measure every module's tensors, forward and backward.

What is measured, and where:

============  ==============  ===================================================  ===========
phase         kind            tensor                                               hook
============  ==============  ===================================================  ===========
forward       ``output``      every floating tensor a module returns               forward
backward      ``grad_output`` gradient of a module's output                        tensor hook
backward      ``grad_input``  gradient of the tensor a module received              tensor hook
backward      ``param_grad``  a parameter's ``.grad`` after it is accumulated      post-accum.
update        ``weight``      a parameter after the step                           ``step()``
update        ``update``      ``parameter after - parameter before`` the step      ``step()``
============  ==============  ===================================================  ===========

Gradient hooks are tensor hooks registered in the forward pass, not
``register_full_backward_hook`` (which breaks modules whose output is later changed in
place). A hook registered on the input before the module runs sees the gradient of that
version of the tensor, so in-place activations (``ReLU(inplace=True)``) are measured
correctly. ``grad_input`` is the gradient autograd computes for that tensor: the sum over
all its uses, as in ``tensor.grad``. A tensor seen by several modules (a module's output is
the next one's input, or a container returns its child's output) is measured once and
filed under every ``(module, kind)`` it belongs to; so is a gradient autograd hands to
several tensors (``x + f(x)`` passes one gradient on to ``f``'s output unchanged).

Each measurement is one int64 vector on the tensor's device (:mod:`.stats`); the vectors
are read out in one transfer per reporting interval (``report_every`` steps, or when a
result is asked for). Under loss scaling the gradients are the scaled ones; pass the
scale to :meth:`Monitor.step` and it is recorded with the step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mixprec.numerics.records import (
    KINDS,
    FirstNonFinite,
    NonFiniteError,
    _Record,
    _Seen,
    _tensors,
)
from mixprec.numerics.results import MonitorResults
from mixprec.numerics.stats import StatsLayout, TensorStats

__all__ = ["KINDS", "TRACK", "FirstNonFinite", "Monitor", "NonFiniteError"]

TRACK = ("activations", "gradients", "weights", "updates")
_KINDS_OF_TRACK = {
    "activations": ("output",),
    "gradients": ("grad_output", "grad_input", "param_grad"),
    "weights": ("weight",),
    "updates": ("update",),
}
DEFAULT_FORMATS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")


def _eager(hook):
    """``hook`` kept out of ``torch.compile`` graphs: Dynamo breaks the graph and runs it eagerly.

    Under ``torch.compile(model)`` a measured step so splits the graph at every module (the
    hooks see real tensors, never fake ones); steps the monitor skips (``every=N``) have no
    hooks and run the compiled graph whole.
    """
    return torch.compiler.disable(hook, recursive=True)


class Monitor(MonitorResults):
    """Per-module, per-format statistics of activations, gradients, weights and updates.

    Args:
        model: the module to watch (every submodule and parameter is watched).
        formats: target format names; for each, the fractions of every tensor that would
            overflow, be subnormal or flush to zero if cast to it.
        every: measure one step in ``every`` (steps ``0, every, 2 * every, ...``).
        track: any of ``"activations"``, ``"gradients"``, ``"weights"``, ``"updates"``.
        report_every: read the device-side results out every this many steps.
        raise_on_nonfinite: raise :class:`NonFiniteError` at the first inf/NaN (this
            synchronises with the device after every measured tensor).
        loss_threshold: the lost fraction (overflow + flush) a format may have and still
            "fit" a module in :meth:`verdicts`.
        window: measured steps whose per-step statistics are kept (the last ``window``);
            the statistics merged over every step, the first inf/NaN ever seen and the
            step count are kept for the whole run, so memory stays flat however long it is.

    Call :meth:`step` once per training step, after the optimizer step (it measures weights
    and updates and advances the step count). With a loss scaler pass ``scale=``.

    The monitor watches from construction (``Monitor(model)`` alone records); ``with`` or
    :meth:`detach` removes its hooks at the end. Forward passes run without gradients
    (evaluation under ``torch.no_grad()`` or ``torch.inference_mode()``) are not training
    steps: they are skipped, not merged into the step, and counted in ``skipped_forwards``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Monitor(model, formats=["fp16", "fp8_e5m2"]) as monitor:
        ...     for _ in range(2):
        ...         model(torch.randn(8, 4)).square().mean().backward()
        ...         opt.step(); opt.zero_grad(); monitor.step()
        >>> monitor.stats("0", "output").numel
        64
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        formats: Iterable[str] = DEFAULT_FORMATS,
        every: int = 1,
        track: Iterable[str] = TRACK,
        report_every: int = 50,
        raise_on_nonfinite: bool = False,
        loss_threshold: float = 0.01,
        window: int = 100,
    ) -> None:
        from mixprec.formats import get_format

        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Monitor(model): model must be a torch.nn.Module, got {type(model).__name__} "
                f"{model!r:.60}"
            )
        if isinstance(formats, str):
            formats = (formats,)
        self.formats = tuple(get_format(f) for f in formats)  # ValueError lists the names
        self.format_names = tuple(f.name for f in self.formats)
        if not self.formats:
            raise ValueError("formats is empty; give at least one format name")
        if isinstance(track, str):
            track = (track,)
        track = tuple(track)
        for t in track:
            if t not in TRACK:
                raise ValueError(f"track={t!r} is not one of {', '.join(map(repr, TRACK))}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer")
        if not isinstance(report_every, int) or report_every < 1:
            raise ValueError(f"report_every={report_every!r} must be a positive integer")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be a positive integer")
        if not 0.0 <= loss_threshold < 1.0:
            raise ValueError(f"loss_threshold={loss_threshold!r} must be in [0, 1)")
        self.model = model
        self.every = every
        self.track = track
        self.kinds = tuple(k for t in track for k in _KINDS_OF_TRACK[t])
        self.report_every = report_every
        self.raise_on_nonfinite = raise_on_nonfinite
        self.loss_threshold = loss_threshold
        self.window = window
        self.layout = StatsLayout(self.formats)
        self.module_paths = [name for name, _ in model.named_modules()]
        self.param_names = [name for name, _ in model.named_parameters()]
        self._handles: list = []
        self._attached = False
        self._step = 0
        self._seq = 0
        self._pending: list[_Record] = []
        self._seen: dict[tuple[int, int], _Seen] = {}
        self._snapshot: dict[str, torch.Tensor] = {}
        self._scales: dict[int, object] = {}
        # host side results: per step for the last `window` measured steps, merged for all
        self.results: dict[int, dict[tuple[str, str], TensorStats]] = {}
        self.totals: dict[tuple[str, str], TensorStats] = {}
        self._host_scales: dict[int, float] = {}
        self._first: dict[int, FirstNonFinite] = {}  # steps in the window
        self._first_ever: FirstNonFinite | None = None
        self._last_readout_step = 0
        self.skipped_forwards = 0  # forwards run without gradients (evaluation): not recorded
        self.attach()  # Monitor(model) without `with` must not silently record nothing

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The step being measured now (the number of :meth:`step` calls so far)."""
        return self._step

    @property
    def sampling(self) -> bool:
        """Whether the current step is measured."""
        return self._attached and self._step % self.every == 0

    def attach(self) -> Monitor:
        """Start watching the model (idempotent). Returns ``self``.

        Hooks are registered only for the steps that are measured: at the start of a
        measured step (here, or in :meth:`step`) and removed when it ends, so the steps
        ``every=N`` skips run the model exactly as without a monitor (no module hook puts
        ``Module.__call__`` on its slow path, no parameter hook runs in backward).
        """
        if self._attached:
            return self
        self._attached = True
        self._sync_hooks()
        self._maybe_snapshot()
        return self

    def _sync_hooks(self) -> None:
        """Hooks registered exactly while the current step is measured."""
        if self.sampling and not self._handles:
            self._register_hooks()
        elif not self.sampling and self._handles:
            self._remove_hooks()

    def _register_hooks(self) -> None:
        # Every hook runs eagerly, outside any torch.compile graph (_eager): Dynamo would
        # otherwise inline it and hand the statistics code fake tensors.
        want = set(self.kinds)
        for path, module in self.model.named_modules():
            if "grad_input" in want:
                self._handles.append(
                    module.register_forward_pre_hook(
                        _eager(self._pre_hook(path)), with_kwargs=True
                    )
                )
            if want & {"output", "grad_output"}:
                self._handles.append(
                    module.register_forward_hook(_eager(self._post_hook(path, module)))
                )
        if "param_grad" in want:
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(_eager(self._param_hook(name)))
                    )

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def detach(self) -> None:
        """Remove every hook (module, parameter and pending tensor hooks)."""
        self._remove_hooks()
        self._clear_seen()
        self._snapshot.clear()
        self._attached = False

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- recording ----------------------------------------------------------------------
    def _record(self, tensor: torch.Tensor, *keys: tuple[str, str]) -> _Record:
        self._seq += 1
        rec = _Record(self._seq, self._step, tensor.dtype, keys, self.layout.compute(tensor))
        self._pending.append(rec)
        if self.raise_on_nonfinite:
            self._check_now(rec)
        return rec

    def _check_now(self, rec: _Record) -> None:
        bad = rec.vec[self.layout.nonfinite_start : self.layout.n_intervals].sum()
        if bad.item():  # syncs: only with raise_on_nonfinite
            self.readout()
            first = self._first.get(rec.step)
            raise NonFiniteError(first.message() if first else f"non-finite at step {rec.step}")

    def _seen_entry(self, tensor: torch.Tensor) -> _Seen:
        key = (id(tensor), tensor._version)
        entry = self._seen.get(key)
        if entry is None or entry.ref() is not tensor:
            entry = _Seen(tensor)
            self._seen[key] = entry
        return entry

    def _hook_grad(self, tensor: torch.Tensor, key: tuple[str, str]) -> None:
        if not tensor.requires_grad:
            return
        entry = self._seen_entry(tensor)
        if entry.grad_keys is None:
            entry.grad_keys = [key]
            keys = entry.grad_keys

            def hook(grad: torch.Tensor) -> None:
                if self._attached and grad is not None:
                    self._record_once(grad, keys)

            try:
                entry.handle = tensor.register_hook(_eager(hook))
            except RuntimeError:  # e.g. a tensor that cannot take hooks
                entry.grad_keys = None
        elif key not in entry.grad_keys:
            entry.grad_keys.append(key)

    def _record_once(self, tensor: torch.Tensor, keys: list) -> None:
        """Measure a tensor once per step and version, however many keys it is met under.

        A module's output is also its container's output; autograd hands one gradient to
        several tensors (``a + b`` passes its output's gradient on to both, so a residual
        block's output and its last layer's output get the same tensor).
        """
        entry = self._seen_entry(tensor)
        if entry.record is None:
            entry.record = self._record(tensor, *keys)
        else:
            entry.record.keys.extend(k for k in keys if k not in entry.record.keys)

    def _pre_hook(self, path: str):
        def pre_hook(module, args, kwargs):
            if not self.sampling or not torch.is_grad_enabled():
                return None
            for t in _tensors((args, kwargs)):
                self._hook_grad(t, (path, "grad_input"))
            return None

        return pre_hook

    def _post_hook(self, path: str, module: nn.Module):
        is_root = module is self.model
        want_out = "output" in self.kinds
        want_grad = "grad_output" in self.kinds

        def post_hook(module, args, output):
            if not self.sampling:
                return None
            if not torch.is_grad_enabled():  # evaluation: not part of the training step
                self.skipped_forwards += is_root
                return None
            key = (path, "output")
            for t in _tensors(output):
                if want_out:
                    self._record_once(t, [key])
                if want_grad and torch.is_grad_enabled():
                    self._hook_grad(t, (path, "grad_output"))
            if is_root:  # end of the forward pass: forget identities, keep the hooks
                self._seen = {k: v for k, v in self._seen.items() if v.handle is not None}
            return None

        return post_hook

    def _param_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.sampling and p.grad is not None:
                self._record(p.grad, (name, "param_grad"))

        return hook

    def _clear_seen(self) -> None:
        for entry in self._seen.values():
            if entry.handle is not None:
                entry.handle.remove()
        self._seen.clear()

    def _maybe_snapshot(self) -> None:
        """Copy the parameters before a measured step, into buffers kept between steps.

        A fresh multi-MB tensor per step costs page faults on the CPU; the buffers are
        reused (and freed when a step is not measured, or on :meth:`detach`).
        """
        if not (self.sampling and "update" in self.kinds):
            self._snapshot.clear()
            return
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                old = self._snapshot.get(n)
                if old is None or old.shape != p.shape or old.dtype != p.dtype:
                    self._snapshot[n] = p.detach().clone()
                else:
                    old.copy_(p.detach())

    def step(self, *, scale: float | torch.Tensor | None = None) -> None:
        """End the current step: measure weights and updates, then advance the step count.

        Args:
            scale: the loss scale this step's backward used (a float or a 0-dim tensor,
                kept on the device until the readout); recorded with the step's statistics.
        """
        if self.sampling:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if "weight" in self.kinds:
                        self._record(p, (name, "weight"))
                    old = self._snapshot.get(name)
                    if old is not None and old.shape == p.shape:
                        if p.dtype == torch.float32 and old.dtype == torch.float32:
                            update = torch.sub(p.detach(), old, out=old)  # reused buffer
                        else:
                            update = p.detach().float() - old.float()
                        self._record(update, (name, "update"))
            if scale is not None:
                self._scales[self._step] = (
                    scale.detach().clone() if isinstance(scale, torch.Tensor) else float(scale)
                )
        self._clear_seen()
        self._step += 1
        if self._attached:
            self._sync_hooks()
        self._maybe_snapshot()
        if self._step - self._last_readout_step >= self.report_every:
            self.readout()
