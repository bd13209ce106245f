"""Precision: setup / autocast / backward / step / state_dict (see :mod:`mixprec.precision`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixprec.distributed import plan as distributed
from mixprec.master import cast_module_
from mixprec.precision.nonfinite import NonFiniteGuard, NonFinitePolicy, check_policy
from mixprec.precision.parts import (
    CudaContext,
    NoAutocast,
    OptimizerPlan,
    StepResult,
    Tf32Flags,
    build_plan,
    check_loss,
    check_max_grad_norm,
    make_scaler,
)
from mixprec.precision.prepare import check_model_dtype, convert_fp8
from mixprec.precision.state import check_state, load_plans_state, plans_state
from mixprec.precision.stepping import unscale_and_step
from mixprec.recipes import Recipe, get_recipe

__all__ = ["Precision"]


class Precision:
    """Carry out a :class:`~mixprec.recipes.Recipe` on a model and its optimizers.

    Args:
        recipe_or_name: a :class:`Recipe`, a built-in name (``"bf16-mixed"``) or a
            ``key=value`` string; unknown names raise ``ValueError`` listing the recipes.
        scaler: a :class:`mixprec.scaling.LossScaler` to use instead of the recipe's.
        seed: seed of the stochastic-rounding generator (recipes with
            ``update="stochastic"``); by default ``torch.initial_seed()``.
        grad_comm_dtype: dtype DDP / FSDP2 communicate gradients in (fp32, bf16, fp16);
            ``None``: the gradients' own dtype (see :mod:`mixprec.distributed`).
        nonfinite: what ``step`` does with an inf / NaN gradient, for every recipe:
            ``"skip"`` the step (default), ``"raise"`` :class:`NonFiniteGradientError`,
            or ``"ignore"`` it (no check, no cost; not with loss scaling). See
            :mod:`mixprec.precision.nonfinite` for what each costs.
        max_consecutive_skips: with ``"skip"``, this many skipped steps in a row raise
            :class:`NonFiniteGradientError` naming the first non-finite parameter (checked
            every 100 steps; with loss scaling the scaler's floor check does this).

    Lifetime: ``setup`` sets the process-wide TF32 flags to the recipe's (off for
    ``fp32``, on for ``tf32``), so forward, backward and step all follow the recipe;
    :meth:`close` (or leaving ``with Precision(...) as precision:``) restores the user's.

    Attributes:
        recipe: the recipe. scaler: the loss scaler (a disabled one is a no-op).
        last_grad_norm: total grad norm (0-dim tensor, before clipping) from the last
            ``step`` that clipped, else None.
        skipped_steps: steps skipped because of an inf / NaN gradient (reading it syncs).

    Example:
        >>> p = Precision("fp16-mixed")
        >>> p.recipe.compute_dtype
        torch.float16
    """

    def __init__(
        self,
        recipe_or_name: str | Recipe,
        *,
        scaler=None,
        seed: int | None = None,
        grad_comm_dtype: torch.dtype | None = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_skips: int = 10,
    ):
        self.recipe = get_recipe(recipe_or_name)
        self._grad_comm_dtype = grad_comm_dtype  # mixprec.distributed
        self._dist: distributed.DistributedSetup | None = None
        self.scaler = scaler if scaler is not None else make_scaler(self.recipe)
        self._scaling = bool(getattr(self.scaler, "enabled", True))
        check_policy(nonfinite, loss_scaling=self._scaling, max_consecutive=max_consecutive_skips)
        self.nonfinite = nonfinite
        self._guard = NonFiniteGuard(
            nonfinite, check_grads=not self._scaling, max_consecutive=max_consecutive_skips
        )
        self._tf32 = Tf32Flags()
        self._closed = False
        self._set_up_params: set[int] = set()  # ids of model parameters setup() has seen
        self._seed = seed
        self._plans: dict[int, OptimizerPlan] = {}
        self._epoch = 0  # number of backward() calls so far
        self._stepped: set[int] = set()  # optimizers stepped in the current iteration
        self._found_infs: list[torch.Tensor] = []
        self._device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self._context_factory = self._build_context()
        self.last_grad_norm: torch.Tensor | None = None
        self._names: dict[int, str] | None = None  # parameter names, set by setup()

    # -- lifetime -----------------------------------------------------------------------
    def __enter__(self) -> Precision:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Restore the TF32 flags ``setup`` changed; afterwards backward / step refuse.

        Idempotent. ``with Precision(...) as precision:`` calls it on leaving the block.
        """
        self._tf32.restore()
        self._closed = True

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{what}() on a closed Precision: close() restored the TF32 flags it had "
                "set; make a new Precision to train again"
            )

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient held an inf / NaN (one host sync)."""
        return self._guard.skipped_steps

    # -- setup --------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer):
        """Prepare ``model`` and ``optimizer`` (one or a list) for the recipe.

        Both are changed in place and returned: parameters are cast, fp8 Linear layers
        swapped in, and the optimizer's param_groups made to hold the tensors it should
        step (fp32 masters for master-weight recipes). Keeps every hyperparameter.

        Raises:
            ValueError: if the model is already 16-bit and the recipe expects fp32
                parameters (use fp16-master / bf16-master / bf16-true instead).

        Example:
            >>> m = nn.Linear(4, 2); o = torch.optim.SGD(m.parameters(), lr=0.1)
            >>> m, o = Precision("bf16-master").setup(m, o)
            >>> m.weight.dtype, o.param_groups[0]["params"][0].dtype
            (torch.bfloat16, torch.float32)
        """
        self._check_open("setup")
        optimizers = list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
        if not isinstance(model, nn.Module):
            raise TypeError(f"setup() needs an nn.Module, got {type(model).__name__}")
        if any(id(p) in self._set_up_params for p in model.parameters()):
            raise RuntimeError(
                "setup() was already called with this model's parameters: call it once, "
                "with every optimizer, precision.setup(model, [opt_a, opt_b]) (a second "
                "setup would cast them and build master weights over them again)"
            )
        # distributed (DDP / FSDP2): check the combination, work on the wrapped module, and
        # under FSDP2 leave casting to its MixedPrecisionPolicy (mixprec.distributed.plan)
        self._dist = distributed.begin_setup(
            model, self.recipe, grad_comm_dtype=self._grad_comm_dtype
        )
        wrapped, model, recipe = model, self._dist.module, self._dist.recipe
        check_model_dtype(self.recipe, model)
        first = next(model.parameters(), None)
        if first is not None:
            self._device_type = first.device.type
            self._context_factory = self._build_context()
        if recipe.fp8 != "off":
            convert_fp8(self.recipe, model)
        if recipe.param_dtype != torch.float32:
            cast_module_(model, recipe.param_dtype, keep_norms_fp32=recipe.keep_norms_fp32)
        self._names = {id(p): name for name, p in model.named_parameters()}
        for opt in optimizers:
            self.add_optimizer(opt)
        model = distributed.finish_setup(self._dist, model, wrapped)  # DDP: re-wrap if cast
        self._set_up_params.update(id(p) for p in model.parameters())
        self._tf32.apply(recipe.allow_tf32)  # forward, backward and step: until close()
        return model, (optimizer if not isinstance(optimizer, Sequence) else optimizers)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Prepare one more optimizer of the model given to :meth:`setup`.

        For frameworks that hand over the optimizer after the model (Lightning Fabric):
        ``setup(model, [])`` first, this later. Gradients a backward already left in the
        16-bit parameters are carried into the fp32 master gradients, so a step is the same
        whichever comes first.

        Raises:
            RuntimeError: before :meth:`setup`, or for an optimizer already set up.
        """
        self._check_open("add_optimizer")
        if self._names is None:
            raise RuntimeError("add_optimizer() before setup(): call precision.setup(model, [])")
        if id(optimizer) in self._plans:
            raise RuntimeError("this optimizer was already set up by this Precision")
        seed = self._seed if self._seed is not None else torch.initial_seed()
        self._plans[id(optimizer)] = build_plan(optimizer, self._dist.recipe, self._names, seed)

    # -- autocast -----------------------------------------------------------------------
    def _build_context(self):
        recipe = self.recipe
        dtype = recipe.compute_dtype if recipe.uses_autocast else None
        if self._device_type == "cuda":
            return lambda: CudaContext(dtype, recipe.allow_tf32)
        if dtype is None:
            return NoAutocast
        device_type = self._device_type
        return lambda: torch.autocast(device_type, dtype=dtype)

    def autocast(self):
        """Context manager (and decorator) for the forward pass.

        ``torch.autocast`` with the recipe's compute dtype on the model's device type when
        it differs from the param dtype; nothing otherwise. On CUDA, TF32 matmuls and
        convolutions are allowed or not per ``recipe.allow_tf32`` inside, restored on exit.

        Example:
            >>> p = Precision("bf16-mixed")
            >>> with p.autocast():
            ...     y = torch.ones(2, 2) @ torch.ones(2, 2)
            >>> y.dtype
            torch.bfloat16
        """
        return self._context_factory()

    # -- backward / step ----------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, backward_fn=None, **kwargs) -> None:
        """Back-propagate ``loss`` times the loss scale (kwargs go to ``Tensor.backward``).

        Call it once per micro-batch (gradients accumulate) and once per loss.
        ``backward_fn(scaled_loss)``, when given, runs the backward instead of
        ``scaled_loss.backward(**kwargs)`` (a framework's own hook, e.g.
        ``LightningModule.backward``).

        Raises:
            TypeError: if ``loss`` is not a tensor, or ``backward_fn`` comes with kwargs.
            RuntimeError: if ``loss`` has more than one element, or after :meth:`close`.
        """
        if backward_fn is not None and kwargs:
            raise TypeError(
                f"backward() got backward_fn and Tensor.backward arguments {sorted(kwargs)}: "
                "pass them to Tensor.backward inside backward_fn"
            )
        self._check_open("backward")
        check_loss(loss)
        if self._stepped:  # a new iteration starts before every optimizer stepped
            self._finish_iteration()
        self._epoch += 1
        if self._scaling:
            loss = self.scaler.scale_loss(loss)
        if backward_fn is None:
            loss.backward(**kwargs)
        else:
            backward_fn(loss)

    def step(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = None):
        """Unscale, check for inf/NaN, clip, step or skip, zero the grads.

        Args:
            optimizer: an optimizer passed to :meth:`setup`.
            max_grad_norm: clip the total 2-norm of the (unscaled) gradients to this, as
                ``torch.nn.utils.clip_grad_norm_`` does (bit for bit); a positive finite
                number or None.

        Returns:
            :class:`StepResult`, truthy when the step was taken. On the sync-free path
            (a fused optimizer) reading it as a bool is a host sync.

        Raises:
            RuntimeError: if there was no ``backward`` since this optimizer's last step.
            ValueError: ``max_grad_norm`` is negative, zero, nan or inf.
            NonFiniteGradientError: policy ``"raise"`` and a non-finite gradient, or
                ``max_consecutive_skips`` skipped steps in a row.
        """
        self._check_open("step")
        max_grad_norm = check_max_grad_norm(max_grad_norm)
        plan = self._plans.get(id(optimizer))
        if plan is None:
            raise RuntimeError(
                "step() got an optimizer that setup() has not seen: call "
                "model, optimizer = precision.setup(model, optimizer) first"
            )
        if plan.last_epoch == self._epoch:
            if self._epoch == 0:
                raise RuntimeError(
                    "step() called before any backward(): call precision.backward(loss) "
                    "first (loss.backward() alone skips the loss scale)"
                )
            raise RuntimeError(
                "step() called twice for the same optimizer without backward() in between: "
                "call precision.backward(loss) once per micro-batch, then step() once"
            )
        if not self._stepped:  # first optimizer of the iteration: ranks agree on fp8 scales
            self._dist.before_step()
        opt = plan.optimizer
        if len(opt.param_groups) != plan.n_groups:  # add_param_group() after setup()
            plan.refresh()
        plan.last_epoch = self._epoch
        if plan.masters is not None:
            plan.masters.gather_grads()
        elif plan.compensated is not None and not plan.compensated.native:
            plan.compensated.begin()
            try:
                result, found_inf = self._unscale_and_step(plan, max_grad_norm)
            finally:  # the bf16 params come back even if the optimizer raised
                plan.compensated.end()
            opt.zero_grad(set_to_none=True)
            return self._end_step(plan, result, found_inf)
        result, found_inf = self._unscale_and_step(plan, max_grad_norm)
        if plan.masters is not None:
            plan.masters.copy_back()
            plan.masters.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        return self._end_step(plan, result, found_inf)

    def _unscale_and_step(self, plan: OptimizerPlan, max_grad_norm: float | None):
        result, found_inf, norm = unscale_and_step(
            plan, max_grad_norm, scaler=self.scaler if self._scaling else None,
            guard=self._guard, dist=self._dist,
        )  # fmt: skip
        if norm is not None:
            self.last_grad_norm = norm
        return result, found_inf

    def _end_step(self, plan: OptimizerPlan, result: StepResult, found_inf) -> StepResult:
        if found_inf is not None:
            self._found_infs.append(found_inf)
        self._stepped.add(id(plan.optimizer))
        if len(self._stepped) == len(self._plans):
            self._finish_iteration()
        return result

    def _finish_iteration(self) -> None:
        if self._dist is not None:
            self._dist.after_step()  # FSDP2 fp8 all-gather: next scales, one all-reduce
        found = None
        if self._found_infs:
            found = self._found_infs[0]
            for other in self._found_infs[1:]:
                found = found + other
        if self._scaling and found is not None:
            self.scaler.update(found)
        self._guard.record(found)
        self._found_infs = []
        self._stepped = set()

    # -- metrics ------------------------------------------------------------------------
    def metrics(self, monitor=None, *, layers: bool = True) -> dict[str, float]:
        """Loss scale, skipped steps, grad norm (and a monitor's per-layer summaries) as a
        plain dict for a logger; names and formulas in :mod:`mixprec.precision.metrics`.

        .. warning:: Reads a few scalars from the device (a host sync): call it when logging.

        Example:
            >>> Precision("bf16-mixed").metrics()["precision/loss_scale"]
            1.0
        """
        from mixprec.precision.metrics import precision_metrics

        return precision_metrics(self, monitor, layers=layers)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Scaler, skip counters, master weights and compensation buffers, for a bit-exact
        resume (layout: :mod:`mixprec.precision.state`).

        Save it with the model's and the optimizers' state dicts; restore all three after
        ``setup`` in a fresh process.
        """
        return {
            "recipe": str(self.recipe),
            "scaler": self.scaler.state_dict(),
            "nonfinite": self._guard.state_dict(),
            "optimizers": plans_state(self._plans.values()),
        }

    def check_state_dict(self, state: dict) -> None:
        """Raise if :meth:`load_state_dict` would refuse ``state``; changes nothing."""
        check_state(state, str(self.recipe), list(self._plans.values()))

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (after :meth:`setup`, same optimizer order).

        Everything is checked first (:func:`mixprec.precision.state.check_state`): a state
        of another recipe, model or optimizer list raises with nothing changed.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: a missing key, another recipe, another number of optimizers, or
                master / compensation buffers of other shapes.
        """
        self.check_state_dict(state)
        self.scaler.load_state_dict(state["scaler"])
        if "nonfinite" in state:
            self._guard.load_state_dict(state["nonfinite"])
        load_plans_state(self._plans.values(), state["optimizers"])
