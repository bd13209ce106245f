"""The monitor's hooks: they measure a model's tensors during a measured step.

A :class:`Recorder` registers module, parameter and tensor hooks for the steps a
:class:`~mixprec.numerics.Monitor` measures (and removes them for the others), computes each
tensor's statistics vector on its device (:meth:`StatsLayout.compute
<mixprec.numerics.stats.StatsLayout.compute>`) and hands it to the
:class:`~mixprec.numerics.results.MonitorResults` it was given. The Monitor holds one and
tells it when a step begins and ends; the table of what is measured where is in
:mod:`.monitor`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

from mixprec.numerics.records import NonFiniteError, Record
from mixprec.numerics.results import MonitorResults
from mixprec.numerics.stats import StatsLayout

__all__ = ["Recorder"]

Key = tuple[str, str]  # (module path or parameter name, kind)


def _eager(hook):
    """``hook`` kept out of ``torch.compile`` graphs: Dynamo breaks the graph and runs it eagerly.

    Under ``torch.compile(model)`` a measured step therefore splits the graph at every module
    (the hooks see real tensors, never fake ones); steps the monitor skips (``every=N``)
    have no hooks and run the compiled graph whole.
    """
    return torch.compiler.disable(hook, recursive=True)


class _Seen:
    """A tensor met in this step, forward output or gradient (by identity and version)."""

    __slots__ = ("ref", "record", "grad_keys", "handle")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.record: Record | None = None
        self.grad_keys: list[Key] | None = None
        self.handle = None


def _tensors(obj) -> Iterable[torch.Tensor]:
    """Floating-point tensors in a (nested) tuple / list / dict output."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class Recorder:
    """Hooks that measure ``kinds`` of a model's tensors into ``results``.

    Args:
        model: the watched module.
        kinds: the tensor kinds to measure (:data:`~mixprec.numerics.records.KINDS`).
        layout: computes each tensor's statistics vector.
        results: receives every measurement (and is read out to check for inf/NaN).
        raise_on_nonfinite: raise :class:`NonFiniteError` at the first inf/NaN (reads each
            measurement back at once: a device synchronisation per tensor).

    Attributes:
        step: the step being recorded (set by :meth:`begin`).
        measuring: whether that step is measured (hooks registered).
        skipped_forwards: forwards of the model run without gradients (evaluation) during
            measured steps: not recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        kinds: tuple[str, ...],
        layout: StatsLayout,
        results: MonitorResults,
        *,
        raise_on_nonfinite: bool,
    ) -> None:
        self.model = model
        self.kinds = kinds
        self.layout = layout
        self.results = results
        self.raise_on_nonfinite = raise_on_nonfinite
        self.step = 0
        self.measuring = False
        self.skipped_forwards = 0
        self._handles: list = []
        self._seen: dict[tuple[int, int], _Seen] = {}
        self._snapshot: dict[str, torch.Tensor] = {}

    # -- steps --------------------------------------------------------------------------
    def begin(self, step: int, *, measure: bool) -> None:
        """Start recording ``step``: hooks registered only if it is measured.

        Hooks exist only during measured steps, so the steps ``every=N`` skips run the model
        exactly as without a monitor (no module hook puts ``Module.__call__`` on its slow
        path, no parameter hook runs in backward).
        """
        self.step, self.measuring = step, measure
        if measure and not self._handles:
            self._register_hooks()
        elif not measure and self._handles:
            self._remove_hooks()
        self._maybe_snapshot()

    def end(self) -> None:
        """End the current step: measure weights and updates if it is measured, and forget
        the tensors met in it (removing their gradient hooks)."""
        if self.measuring:
            self._measure_parameters()
        self._clear_seen()

    def stop(self) -> None:
        """Remove every hook (module, parameter and pending tensor hooks) and free buffers."""
        self._remove_hooks()
        self._clear_seen()
        self._snapshot.clear()
        self.measuring = False

    def _register_hooks(self) -> None:
        # Every hook runs eagerly, outside any torch.compile graph (_eager): Dynamo would
        # otherwise inline it and hand the statistics code fake tensors.
        want = set(self.kinds)
        for path, module in self.model.named_modules():
            if "grad_input" in want:
                self._handles.append(
                    module.register_forward_pre_hook(_eager(self._pre_hook(path)), with_kwargs=True)
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

    # -- recording ----------------------------------------------------------------------
    def _record(self, tensor: torch.Tensor, *keys: Key) -> Record:
        rec = Record(self.step, tensor.dtype, list(keys), self.layout.compute(tensor))
        self.results.add(rec)
        if self.raise_on_nonfinite:
            self._check_now(rec)
        return rec

    def _check_now(self, rec: Record) -> None:
        bad = rec.vec[self.layout.nonfinite_start : self.layout.n_intervals].sum()
        if bad.item():  # syncs: only with raise_on_nonfinite
            first = self.results.first_nonfinite_in(rec.step)  # reads out
            raise NonFiniteError(first.message() if first else f"non-finite at step {rec.step}")

    def _seen_entry(self, tensor: torch.Tensor) -> _Seen:
        key = (id(tensor), tensor._version)
        entry = self._seen.get(key)
        if entry is None or entry.ref() is not tensor:
            entry = _Seen(tensor)
            self._seen[key] = entry
        return entry

    def _hook_grad(self, tensor: torch.Tensor, key: Key) -> None:
        if not tensor.requires_grad:
            return
        entry = self._seen_entry(tensor)
        if entry.grad_keys is None:
            entry.grad_keys = [key]
            keys = entry.grad_keys

            def hook(grad: torch.Tensor) -> None:
                if self.measuring and grad is not None:
                    self._record_once(grad, keys)

            try:
                entry.handle = tensor.register_hook(_eager(hook))
            except RuntimeError:  # e.g. a tensor that cannot take hooks
                entry.grad_keys = None
        elif key not in entry.grad_keys:
            entry.grad_keys.append(key)

    def _record_once(self, tensor: torch.Tensor, keys: list[Key]) -> None:
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
            if not self.measuring or not torch.is_grad_enabled():
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
            if not self.measuring:
                return None
            if not torch.is_grad_enabled():  # evaluation: not part of the training step
                self.skipped_forwards += is_root
                return None
            key = (path, "output")
            for t in _tensors(output):
                if want_out:
                    self._record_once(t, [key])
                if want_grad:
                    self._hook_grad(t, (path, "grad_output"))
            if is_root:  # end of the forward pass: forget identities, keep the hooks
                self._seen = {k: v for k, v in self._seen.items() if v.handle is not None}
            return None

        return post_hook

    def _param_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.measuring and p.grad is not None:
                self._record(p.grad, (name, "param_grad"))

        return hook

    def _clear_seen(self) -> None:
        for entry in self._seen.values():
            if entry.handle is not None:
                entry.handle.remove()
        self._seen.clear()

    # -- weights and updates ------------------------------------------------------------
    def _maybe_snapshot(self) -> None:
        """Copy the parameters before a measured step, into buffers kept between steps.

        A fresh multi-MB tensor per step costs page faults on the CPU; the buffers are
        reused (and freed when a step is not measured, or on :meth:`stop`).
        """
        if not (self.measuring and "update" in self.kinds):
            self._snapshot.clear()
            return
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                old = self._snapshot.get(n)
                if old is None or old.shape != p.shape or old.dtype != p.dtype:
                    self._snapshot[n] = p.detach().clone()
                else:
                    old.copy_(p.detach())

    def _measure_parameters(self) -> None:
        """Record each parameter (``weight``) and its change since the snapshot (``update``)."""
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
