"""Data-parallel training under every recipe: DDP and FSDP2, launched with ``torchrun``.

mixprec runs on PyTorch's own engine and adds what precision needs there:

* :func:`~mixprec.distributed.plan.begin_setup` / ``finish_setup``: the hooks
  ``Precision.setup`` calls for a ``DistributedDataParallel`` or ``fully_shard``-ed model
  (which recipe/strategy combinations hold is tabled in :mod:`mixprec.distributed.plan`).
* :func:`grad_comm_hook`: DDP gradient all-reduce in fp32, bf16 or fp16.
* :func:`fsdp_policy`, :func:`shard_model`: a recipe as FSDP2's ``MixedPrecisionPolicy``.
* fp8: :func:`sync_float8_amax_history` (delayed scaling: one set of scales for all
  ranks), ``shard_model(..., fp8_all_gather=True)`` (FSDP2 all-gathers weights in fp8,
  :mod:`~mixprec.distributed.fp8_all_gather`), :func:`count_fsdp_bytes`.
* :func:`reduce_found_inf`: the rank-consistent inf/NaN verdict (``all_reduce`` MAX) that
  ``Precision.step`` takes before stepping or skipping, so every rank keeps the same scale.
* :func:`save_checkpoint`, :func:`load_checkpoint`: per-rank files, bit-exact resume.

Example (run with ``torchrun --nproc-per-node 2 train.py``)::

    torch.distributed.init_process_group("gloo")        # "nccl" on GPUs
    model = DistributedDataParallel(model)              # or shard_model(model, "bf16-master")
    precision = mp.Precision("bf16-mixed", grad_comm_dtype=torch.bfloat16)
    model, opt = precision.setup(model, opt)            # use the returned model
"""

from mixprec.distributed.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
)
from mixprec.distributed.comm_bytes import CommBytes, count_fsdp_bytes
from mixprec.distributed.compat import check_recipe
from mixprec.distributed.core import global_grad_norm, is_sharded, local_tensor
from mixprec.distributed.ddp import COMM_DTYPES, grad_comm_hook, register_grad_comm_hook
from mixprec.distributed.fp8_all_gather import Float8AllGatherWeight, enable_float8_all_gather
from mixprec.distributed.fp8_sync import sync_float8_amax_history
from mixprec.distributed.fsdp import fsdp_policies, fsdp_policy, shard_model

# What users call. The setup hooks Precision uses (mixprec.distributed.plan) and the
# helpers of the modules stay importable from their modules, not from here.
__all__ = [
    # launching and sharding
    "COMM_DTYPES",
    "check_recipe",
    "fsdp_policies",
    "fsdp_policy",
    "grad_comm_hook",
    "register_grad_comm_hook",
    "shard_model",
    # fp8 under FSDP2 / DDP
    "Float8AllGatherWeight",
    "enable_float8_all_gather",
    "sync_float8_amax_history",
    # checkpoints
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "read_checkpoint_file",
    "save_checkpoint",
    # inspecting sharded tensors and traffic
    "CommBytes",
    "count_fsdp_bytes",
    "global_grad_norm",
    "is_sharded",
    "local_tensor",
]
