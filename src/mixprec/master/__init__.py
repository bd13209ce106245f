"""Low-precision parameters: fp32 master weights in flat buffers, and compensated bf16 updates.

Two ways to train a model whose parameters are stored in 16 bits:

* :class:`MasterWeights` (recipes ``fp16-master``, ``bf16-master``): the optimizer steps
  fp32 *master* copies kept in one flat buffer per (device, dtype) group. Gradients are
  converted to fp32 before the step (``bf16-master`` accumulates them in fp32 as they
  arrive, through post-accumulate-grad hooks); after the step the masters are copied back
  into the 16-bit parameters with one ``copy_`` per group.
* :class:`CompensatedUpdate` (recipe ``bf16-true``): no master copy. In the optimizer
  step each bf16 parameter ``p`` is stood in for by the fp32 value ``v = p + c``; after
  the step ``v`` is rounded back to bf16. For AdamW, Adam and SGD
  (:mod:`mixprec.master.bf16_step`) this happens a chunk of one tensor at a time and the
  optimizer's states are bf16; for any other optimizer ``v`` is an fp32 view the
  optimizer steps, and its states are fp32. With Kahan summation ``c`` is the bf16
  compensation buffer holding what rounding lost (``c = v - bf16(v)``); with stochastic
  rounding there is no buffer and ``bf16(v)`` rounds up with probability equal to the
  distance to the lower neighbour over the gap, so the expected value is ``v``.
  Either way updates smaller than half a bf16 ulp are not lost.

Both keep the user's optimizer object (its hyperparameters and param_groups); any
``torch.optim`` optimizer works, fused ones included.
"""

from mixprec.master.casting import cast_module_, is_norm_module, stochastic_round_to_bf16
from mixprec.master.compensated import CompensatedUpdate
from mixprec.master.weights import MasterWeights

__all__ = [
    "CompensatedUpdate",
    "MasterWeights",
    "cast_module_",
    "is_norm_module",
    "stochastic_round_to_bf16",
]
