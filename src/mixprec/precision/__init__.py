"""``Precision``: train any model and optimizer in any recipe with four calls.

>>> import torch, mixprec as mp
>>> model = torch.nn.Linear(4, 2)
>>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> precision = mp.Precision("bf16-mixed")
>>> model, opt = precision.setup(model, opt)
>>> with precision.autocast():
...     loss = model(torch.randn(8, 4)).square().mean()
>>> precision.backward(loss)
>>> bool(precision.step(opt))
True

What each call does, per recipe (see :mod:`mixprec.recipes`):

* ``setup`` casts parameters to the recipe's param dtype (norm layers stay fp32), sets up
  fp32 master weights (:class:`mixprec.master.MasterWeights`) or compensated bf16
  updates (:class:`mixprec.master.CompensatedUpdate`), and swaps ``Linear`` for
  ``Float8Linear`` for fp8 recipes.
* ``autocast`` runs ``torch.autocast`` with the compute dtype when it differs from the
  param dtype. TF32 follows the recipe from ``setup`` until ``close()`` (or the end of
  ``with Precision(...) as precision:``), so backward and step run under it too; the
  user's flags come back on close.
* ``backward`` multiplies the loss by the loss scale and back-propagates.
* ``step`` gathers fp32 grads, unscales them and checks for inf/NaN (one foreach kernel
  per device and dtype; recipes without loss scaling run the same check at scale 1),
  clips (``torch.nn.utils.get_total_norm`` over the grads in the model's parameter
  order, bit for bit ``clip_grad_norm_(model.parameters())``), steps or skips per the
  ``nonfinite`` policy (:mod:`mixprec.precision.nonfinite`), copies masters back, zeroes
  the grads and updates the scale once every optimizer has stepped.

Host syncs: none in ``backward``; in ``step`` none when the optimizer is fused
(``fused=True`` Adam, AdamW, SGD: the skip decision is passed to its kernel as
``found_inf``) or with ``nonfinite="ignore"``; otherwise exactly one (reading
``found_inf``, as ``torch.amp.GradScaler.step`` does). ``nonfinite="raise"`` reads
``found_inf`` every step; ``"skip"`` reads the consecutive-skip counter once every 100
steps. ``bf16-true`` with AdamW / Adam / SGD steps bf16 states itself
(:mod:`mixprec.master.bf16_step`; it takes no ``found_inf``, so it syncs once per step).

Checkpoints: ``state_dict`` / ``load_state_dict`` (layout and checks in
:mod:`mixprec.precision.state`; everything is checked before anything is loaded).
"""

from mixprec.precision.engine import Precision
from mixprec.precision.nonfinite import NonFiniteGradientError
from mixprec.precision.parts import StepResult

__all__ = ["NonFiniteGradientError", "Precision", "StepResult"]
