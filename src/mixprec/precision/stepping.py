"""One optimizer's step inside ``Precision.step``: unscale or check, clip, step or skip.

Order (torch.amp's, so that the skip decision sees what would be applied)::

    grads      = the optimizer's gradients (local shards when distributed)
    found_inf  = scaler.unscale_(grads)                     with loss scaling
               = NonFiniteGuard.check(grads)                without, unless nonfinite="ignore"
               (MAX over ranks when distributed)
    nonfinite="raise": found_inf read on the host, raise before anything changes
    clip       g *= min(1, max_grad_norm / (total 2-norm + 1e-6))     when asked
    step       fused optimizer: found_inf into its kernel (no host sync)
               bf16-true's own bf16 step on a GPU: found_inf into it (no host sync)
               otherwise: one host read of found_inf, then step or skip
"""

from __future__ import annotations

import torch

from mixprec.precision.nonfinite import NonFiniteGuard
from mixprec.precision.parts import OptimizerPlan, StepResult, clip_grads_

__all__ = ["unscale_and_step"]


def unscale_and_step(
    plan: OptimizerPlan, max_grad_norm: float | None, *, scaler, guard: NonFiniteGuard, dist
) -> tuple[StepResult, torch.Tensor | None, torch.Tensor | None]:
    """Step ``plan``'s optimizer or skip it; ``(StepResult, found_inf, grad norm)``.

    Args:
        plan: the optimizer and what the recipe added to it.
        max_grad_norm: clip to this total 2-norm (checked by the caller), or None.
        scaler: the loss scaler, or None without loss scaling.
        guard: the Precision's non-finite policy and counters.
        dist: the Precision's distributed setup (``local``, ``reduce_found_inf``,
            ``clip_``).

    ``found_inf`` is None when nothing was checked (``nonfinite="ignore"``, no clipping);
    the norm is None without clipping.
    """
    opt = plan.optimizer
    # bf16-true with AdamW / Adam / SGD: the compensated bf16-state step stands in for
    # opt.step(); it takes found_inf on a GPU, on the CPU a host read is cheaper
    native = plan.compensated is not None and plan.compensated.native
    step = plan.compensated.step if native else opt.step
    found_inf = norm = None
    if scaler is not None or guard.check_grads or max_grad_norm is not None:
        grads = plan.grads()
        if scaler is not None:  # distributed: unscale local shards, then MAX over ranks
            found_inf = dist.reduce_found_inf(scaler.unscale_(dist.local(grads), plan.names))
        elif guard.check_grads:  # the same check, at scale 1 (grads unchanged)
            found_inf = dist.reduce_found_inf(guard.check(dist.local(grads)))
        if guard.policy == "raise":
            guard.raise_if_found(found_inf, grads, plan.names)
        elif scaler is None and found_inf is not None:
            guard.check_streak(found_inf, grads, plan.names)
        if max_grad_norm is not None:  # distributed: FSDP2 norms span all shards
            norm = dist.clip_(plan.grads_in_model_order(grads), max_grad_norm, clip_grads_)
    if found_inf is None:
        step()
        return StepResult(True), None, norm
    if plan.fused and not native:
        opt.grad_scale, opt.found_inf = None, found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        return StepResult(found_inf=found_inf), found_inf, norm
    if native and found_inf.device.type != "cpu":  # skipped on the device: no sync
        plan.compensated.step(found_inf)
        return StepResult(found_inf=found_inf), found_inf, norm
    stepped = not bool(found_inf.item())  # the one host sync of this step
    if stepped:
        step()
    return StepResult(stepped, found_inf=found_inf), found_inf, norm
