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
  param dtype, and sets TF32 on CUDA per the recipe (restored on exit).
* ``backward`` multiplies the loss by the loss scale and back-propagates.
* ``step`` gathers fp32 grads, unscales them and checks for inf/NaN (one foreach kernel
  per device and dtype), clips, steps or skips, copies masters back, zeroes the grads and
  updates the scale once every optimizer has stepped.

Host syncs: none in ``backward``; in ``step`` none when no loss scaling is active or the
optimizer is fused (``fused=True`` Adam, AdamW, SGD: the skip decision is passed to its
kernel as ``found_inf``); otherwise exactly one (reading ``found_inf``). ``bf16-true``
with AdamW / Adam / SGD steps bf16 states itself (:mod:`mixprec.master.bf16_step`, no
syncs; it takes no ``found_inf``, so a loss-scaled custom recipe syncs once).
"""

from mixprec.precision.engine import Precision
from mixprec.precision.nonfinite import NonFiniteGradientError
from mixprec.precision.parts import StepResult

__all__ = ["NonFiniteGradientError", "Precision", "StepResult"]
