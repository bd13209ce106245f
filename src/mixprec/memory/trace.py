"""One real micro-batch, traced: what the forward pass saves for backward, and what backward adds.

The model is copied and set up for the recipe by :class:`mixprec.Precision` (so parameter
dtypes, autocast and fp8 Linear layers are exactly those of training); one forward pass
runs under ``torch.autograd.graph.saved_tensors_hooks`` and a
:class:`~mixprec.memory.tracker.StorageTracker`, then one backward pass.

Saved tensors are deduplicated by storage and split three ways:

* parameters themselves (already counted as weights: skipped);
* *static* tensors, computed from parameters and constants only (autocast copies of the
  weights, fp8 copies of the weights): they do not grow with the batch;
* activations: everything else, which grows linearly with the batch.

A tensor is static when every tensor input of the op that made it is static (parameters,
buffers and factory-made constants are static), tracked op by op in the dispatch mode.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.memory.calls import batch_items, call_model, loss_of
from mixprec.memory.fp8 import prepare_fp8
from mixprec.memory.tracker import StorageTracker, _plain_tensors, storages_of
from mixprec.recipes import Recipe

__all__ = ["TraceResult", "trace_step"]

_FP8 = {getattr(torch, n) for n in dir(torch) if n.startswith("float8_")}


@dataclass(frozen=True, slots=True)
class TraceResult:
    """Bytes seen in one traced forward and backward pass.

    Args:
        batch_items: leading size of the traced inputs (the micro-batch).
        batch_bytes: bytes of the batch tensors themselves.
        activations: saved-for-backward bytes that grow with the batch.
        weight_copies: saved static bytes in 16/32-bit (autocast copies of weights).
        fp8_copies: saved static bytes in fp8 dtypes (fp8 copies of weights).
        forward_peak: peak live bytes added during the forward pass (loss included).
        forward_end: live bytes added by the end of the forward pass.
        backward_extra: peak live bytes during backward above the end of the forward.
        backward_grads: bytes of parameter gradients alive at that backward peak.
        buffer_bytes: bytes of the module's buffers after setup (e.g. fp8 scale state).
    """

    batch_items: int
    batch_bytes: int
    activations: int
    weight_copies: int
    fp8_copies: int
    forward_peak: int
    forward_end: int
    backward_extra: int
    backward_grads: int
    buffer_bytes: int


class _StaticTracker(StorageTracker):
    """StorageTracker that also marks storages derived only from static tensors."""

    def __init__(self, static: list[torch.UntypedStorage]) -> None:
        super().__init__()
        self.static_ids = {id(s) for s in static}
        self._keep: list = []  # saved tensors' storages, alive while the graph is built
        self.tracing = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.tracing:
            inputs = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if all(id(s) in self.static_ids for s in storages_of(inputs)):
                for st in storages_of(out):
                    if id(st) not in self.static_ids:
                        self.static_ids.add(id(st))
                        weakref.finalize(st, self.static_ids.discard, id(st))
        return out


_MARK = "mixprec.memory.trace.backward"


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def _backward_peak(prof) -> int:
    """Peak live bytes inside the backward mark above its start, by address (see
    :class:`~mixprec.memory.measure.AllocationReplay`; the forward's allocations are known)."""
    from mixprec.memory.measure import AllocationReplay, allocation_events

    mark = next(e for e in prof.profiler.kineto_results.events() if e.name() == _MARK)
    events = allocation_events(prof)
    replay = AllocationReplay(0)
    replay.apply(events, hi=mark.start_ns())
    replay.live = 0
    return replay.apply(events, lo=mark.start_ns(), hi=mark.end_ns())


def _leaves(obj):
    from torch.utils._pytree import tree_flatten

    return tree_flatten(obj)[0]


def trace_step(
    model: nn.Module,
    recipe: Recipe,
    batch: tuple,
    loss_fn: Callable | None,
    *,
    fp8_config=None,
) -> TraceResult:
    """Trace one forward and backward pass of a copy of ``model`` set up for ``recipe``.

    ``fp8_config``: the :class:`~mixprec.float8.Float8Config` the copy's Linear layers are
    converted with (default: the recipe's; a model already converted keeps its layers).

    Example:
        >>> from mixprec.recipes import get_recipe
        >>> from mixprec.memory.measure import default_loss
        >>> m = nn.Linear(8, 4)
        >>> b = (torch.randn(2, 8), torch.randint(4, (2,)))
        >>> trace_step(m, get_recipe("fp32"), b, default_loss).activations >= 2 * 8 * 4
        True
    """
    from mixprec.precision import Precision

    inputs, targets = batch
    work = copy.deepcopy(model)
    prepare_fp8(work, recipe, fp8_config)
    precision = Precision(recipe)
    work, opt = precision.setup(work, torch.optim.SGD(work.parameters(), lr=0.0))
    params = list(work.parameters())
    param_ids = {id(s) for s in storages_of(params)}
    tracker = _StaticTracker(storages_of([params, list(work.buffers())]))
    # What setup allocated (master weights and their fp32 grad buffers) is alive before the
    # pass: count it now, or its first use in backward would look like new memory.
    stepped = [p for group in opt.param_groups for p in group["params"]]
    tracker.track([params, list(work.buffers()), batch, stepped, [p.grad for p in stepped]])
    # Create the loss scaler's state now: it is not per-batch memory.
    precision.scaler.materialize(params[0].device if params else torch.device("cpu"))
    saved: dict[int, tuple[int, bool, bool]] = {}  # storage id -> (bytes, static, fp8)

    def pack(t: torch.Tensor):
        for inner in _plain_tensors(t):
            if inner.device.type == "meta":
                continue
            st = inner.untyped_storage()
            key = id(st)
            if key in param_ids or key in saved:
                continue
            saved[key] = (st.nbytes(), key in tracker.static_ids, inner.dtype in _FP8)
            tracker._keep.append(st)
        return t

    cpu = not params or params[0].device.type != "cuda"
    prof = _profiler() if cpu else contextlib.nullcontext()
    with prof:
        with tracker:
            start = tracker.live
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with precision.autocast():
                    loss = loss_of(call_model(work, inputs), targets, loss_fn)
            forward_end = tracker.live - start
            forward_peak = tracker.peak - start
            tracker.tracing = False
            tracker._keep.clear()  # the graph holds the saved tensors from here on
            tracker.reset_peak()
            at_peak: list[int] = [0]

            def on_peak(t):
                at_peak[0] = sum(s.nbytes() for s in storages_of([p.grad for p in params]))

            tracker.peak_callbacks.append(on_peak)
            mid = tracker.live
            if cpu:
                tracker.__exit__(None, None, None)  # backward outside the dispatch mode
                tracker.__enter__()
        if cpu:
            # Under a dispatch mode autograd accumulates gradients out of place, and the
            # CPU's GEMM workspaces are not tensors: backward is read from the allocator's
            # events (the forward ran under the same profiler, so its frees are seen).
            with torch.profiler.record_function(_MARK):
                precision.backward(loss)
        else:
            with tracker:
                precision.backward(loss)
    backward_extra = tracker.peak - mid
    if cpu:
        backward_extra = _backward_peak(prof)
        grads = [p.grad for p in params if p.grad is not None]
        at_peak[0] = min(sum(s.nbytes() for s in storages_of(grads)), backward_extra)
    activations = sum(n for n, static, _ in saved.values() if not static)
    weight_copies = sum(n for n, static, fp8 in saved.values() if static and not fp8)
    fp8_copies = sum(n for n, static, fp8 in saved.values() if static and fp8)
    return TraceResult(
        batch_items=batch_items(inputs),
        batch_bytes=sum(s.nbytes() for s in storages_of(batch)),
        activations=activations,
        weight_copies=weight_copies,
        fp8_copies=fp8_copies,
        forward_peak=forward_peak,
        forward_end=forward_end,
        backward_extra=backward_extra,
        backward_grads=at_peak[0],
        buffer_bytes=sum(s.nbytes() for s in storages_of(list(work.buffers()))),
    )
