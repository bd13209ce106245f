"""mixprec.distributed: DDP and FSDP2 on two CPU processes (gloo, loopback only).

Each two-rank test spawns two fresh processes that meet through a FileStore in the test's
tmp_path (no TCP port to pick) and talk over gloo on the loopback interface. A worker
returns plain data serialised with torch.save; the assertions run here, in the parent.
"""

from __future__ import annotations

import functools
import io
import itertools
import multiprocessing
import os
import queue as queue_module
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import mixprec.distributed as mpd
from mixprec import Precision, get_recipe
from tests.conftest import RECIPE_NAMES

WORLD = 2
TIMEOUT_S = 120  # per two-rank run; a hung collective fails the test instead of the suite


# -- harness ------------------------------------------------------------------------------
def _entry(rank: int, store_path: str, fn, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=TIMEOUT_S // 2),
        )
        buffer = io.BytesIO()
        torch.save(fn(rank), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def attempt(build) -> tuple[str, str] | None:
    """``(type name, message)`` of the ValueError or RuntimeError ``build()`` raises; None
    when it raises nothing (the refusal batteries compare these across ranks)."""
    try:
        build()
    except (ValueError, RuntimeError) as exc:
        return type(exc).__name__, str(exc)
    return None


def run_on_two_ranks(tmp_path, fn, **kwargs) -> list:
    """Run ``fn(rank, **kwargs)`` on two gloo ranks; returns the results in rank order."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    target = functools.partial(fn, **kwargs)
    store = str(tmp_path / "store")
    procs = [
        ctx.Process(target=_entry, args=(rank, store, target, results), daemon=True)
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    out: dict[int, object] = {}
    try:
        for _ in range(WORLD):
            rank, status, payload = results.get(timeout=TIMEOUT_S)
            if status != "ok":
                pytest.fail(f"rank {rank} raised:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    except queue_module.Empty:
        pytest.fail(f"two-rank run did not finish in {TIMEOUT_S} s")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [out[rank] for rank in range(WORLD)]


# -- shared pieces ------------------------------------------------------------------------
def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))


def _data(steps: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g))
        for _ in range(steps)
    ]


def _flat(model: nn.Module) -> torch.Tensor:
    """This rank's parameters (its shards under FSDP2), as one fp32 vector."""
    return torch.cat([mpd.local_tensor(p.detach()).float().flatten() for p in model.parameters()])


def _full(model: nn.Module) -> torch.Tensor:
    """All parameters in full (FSDP2 shards gathered: every rank must call it)."""
    full = [p.full_tensor() if mpd.is_sharded(p) else p for p in model.parameters()]
    return torch.cat([p.detach().float().flatten() for p in full])


def _scaler(recipe: str):
    from mixprec.scaling import LossScaler

    # 2**10 keeps the scaled fp16 gradients of these tiny models far from 65504
    return LossScaler.from_preset("torch", init_scale=2.0**10) if "fp16" in recipe else None


def _train(model, precision, opt, batches, rank=None):
    """SGD-style loop; with ``rank`` each rank takes its half of every batch."""
    for x, y in batches:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        with precision.autocast():
            loss = (model(x).float() - y).square().mean()
        precision.backward(loss)
        precision.step(opt)
    return model


# -- scenarios (each runs on both ranks; results go back to the parent) ---------------------
def _inf_on_rank1(rank: int, fused: bool, strategy: str = "ddp"):
    model = _tiny_model()
    model = DDP(model) if strategy == "ddp" else mpd.shard_model(model, "fp16-mixed")
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.05)
    )
    precision = Precision("fp16-mixed", scaler=_scaler("fp16"))
    model, opt = precision.setup(model, opt)
    stepped, scales = [], []
    for i, (x, y) in enumerate(_data(5)):
        with precision.autocast():
            loss = (model(x.chunk(WORLD)[rank]).float() - y.chunk(WORLD)[rank]).square().mean()
        precision.backward(loss)
        if i == 2 and rank == 1:  # after the all-reduce / in rank 1's shard only
            mpd.local_tensor(next(model.parameters()).grad)[0, 0] = float("inf")
        stepped.append(bool(precision.step(opt)))
        scales.append(precision.scaler.get_scale())
    return {"stepped": stepped, "scales": scales, "params": _full(model)}


def _ddp_run(rank: int, recipe: str, comm: torch.dtype | None = None):
    model = DDP(_tiny_model())
    precision = Precision(recipe, scaler=_scaler(recipe), grad_comm_dtype=comm)
    model, opt = precision.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    return _flat(_train(model, precision, opt, _data(4), rank))


def _wire_overflow(rank: int):
    from mixprec.scaling import LossScaler

    model = DDP(_tiny_model())
    # scaled gradients of ~2**24 pass in fp32 but overflow fp16 (max 65504) on the wire
    scaler = LossScaler.from_preset("torch", init_scale=2.0**24)
    precision = Precision("fp16-mixed", scaler=scaler, grad_comm_dtype=torch.float16)
    model, opt = precision.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    stepped, scales = [], []
    for x, y in _data(12):
        with precision.autocast():
            loss = (model(x.chunk(WORLD)[rank]).float() - y.chunk(WORLD)[rank]).square().mean()
        precision.backward(loss)
        stepped.append(bool(precision.step(opt)))
        scales.append(precision.scaler.get_scale())
    return {"stepped": stepped, "scales": scales}


def _ddp_fp8(rank: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))  # fp8 GEMM shapes
    start = _flat(model)
    precision = Precision("fp8-mixed")
    model, opt = precision.setup(DDP(model), torch.optim.SGD(model.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(rank)  # different data on each rank
    for _ in range(3):
        with precision.autocast():
            loss = model(torch.randn(16, 32, generator=g)).float().square().mean()
        precision.backward(loss)
        precision.step(opt)
    return {
        "start": start,
        "params": _flat(model),
        "kinds": [type(m).__name__ for m in model.modules()],
    }


def _single_process(recipe: str) -> torch.Tensor:
    model = _tiny_model()
    precision = Precision(recipe, scaler=_scaler(recipe))
    model, opt = precision.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    return _flat(_train(model, precision, opt, _data(4)))


def _fsdp_gpt(rank: int, recipe: str):
    from mixprec.bench.tasks import get_task

    task = get_task("gpt", "tiny")
    model = mpd.shard_model(task.build_model(), recipe)
    precision = Precision(recipe)
    model, opt = precision.setup(model, task.build_optimizer(model))
    # every rank takes every other batch of the same stream
    batches = list(itertools.islice(task.train_batches(WORLD * 20), rank, None, WORLD))
    losses = []
    for x, y in batches:
        with precision.autocast():
            loss = task.loss(model(x), y)
        precision.backward(loss)
        precision.step(opt, max_grad_norm=1.0)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    policies = {name: p.param_dtype for name, _, p in mpd.fsdp_policies(model)}
    return {"losses": losses, "policies": policies, "norm": precision.last_grad_norm.item()}


def _sharded_norm(rank: int):
    model = mpd.shard_model(_tiny_model(), "bf16-mixed")
    x, y = _data(1)[0]
    (model(x.chunk(WORLD)[rank]).float() - y.chunk(WORLD)[rank]).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    full = torch.cat([g.full_tensor().double().flatten() for g in grads])
    return {
        "global": mpd.global_grad_norm(grads).item(),
        "global_inf": mpd.global_grad_norm(grads, float("inf")).item(),
        "full": full.norm().item(),
        "full_inf": full.abs().max().item(),
        "local": torch.cat([mpd.local_tensor(g).double().flatten() for g in grads]).norm().item(),
    }


def _resume(rank: int, strategy: str, recipe: str, directory: str):
    def build():
        model = _tiny_model()
        model = DDP(model) if strategy == "ddp" else mpd.shard_model(model, recipe)
        precision = Precision(recipe, scaler=_scaler(recipe))
        model, opt = precision.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        return model, opt, precision

    batches = _data(7)
    model, opt, precision = build()
    _train(model, precision, opt, batches[:4], rank)
    mpd.save_checkpoint(directory, model=model, optimizer=opt, precision=precision)
    _train(model, precision, opt, batches[4:], rank)
    straight = (_flat(model), precision.state_dict()["scaler"])
    model, opt, precision = build()
    mpd.load_checkpoint(directory, model=model, optimizer=opt, precision=precision)
    _train(model, precision, opt, batches[4:], rank)
    return straight, (_flat(model), precision.state_dict()["scaler"])


def _refusals(rank: int):
    """Every refused combination, then setup after the process group is gone (runs last)."""
    from torch.distributed.fsdp import fully_shard

    sgd = torch.optim.SGD

    def bf16_storage():
        model = fully_shard(_tiny_model().to(torch.bfloat16))
        Precision("bf16-master").setup(model, sgd(model.parameters(), lr=0.1))

    def wrong_policy():
        model = fully_shard(_tiny_model(), mp_policy=mpd.fsdp_policy("bf16-mixed"))
        Precision("fp16-master").setup(model, sgd(model.parameters(), lr=0.1))

    def root_not_sharded():
        model = _tiny_model()
        fully_shard(model[0])
        Precision("bf16-mixed").setup(model, sgd(model.parameters(), lr=0.1))

    def bf16_true():
        model = fully_shard(_tiny_model())
        Precision("bf16-true").setup(model, sgd(model.parameters(), lr=0.1))

    def fp16_wire_unscaled():
        model = DDP(_tiny_model())
        Precision("bf16-mixed", grad_comm_dtype=torch.float16).setup(
            model, sgd(model.parameters(), lr=0.1)
        )

    def comm_after_sharding():
        model = mpd.shard_model(_tiny_model(), "bf16-mixed")  # reduces in fp32
        Precision("bf16-mixed", grad_comm_dtype=torch.bfloat16).setup(
            model, sgd(model.parameters(), lr=0.1)
        )

    cases = (
        bf16_storage,
        wrong_policy,
        root_not_sharded,
        bf16_true,
        fp16_wire_unscaled,
        comm_after_sharding,
    )
    out = {case.__name__: attempt(case) for case in cases}
    ddp = DDP(_tiny_model())
    dist.destroy_process_group()
    out["no_process_group"] = attempt(
        lambda: Precision("bf16-mixed").setup(ddp, sgd(ddp.parameters(), lr=0.1))
    )
    return out


DDP_RECIPES = ("fp16-mixed", "bf16-mixed", "bf16-master")
# Two batteries, one two-rank run each: starting a process and DDP's first construction
# cost seconds, the scenarios themselves milliseconds.
_BATTERIES = {
    "ddp": [
        ("inf_sgd", _inf_on_rank1, {"fused": False}),
        ("inf_fused", _inf_on_rank1, {"fused": True}),
        *((f"ddp_{r}", _ddp_run, {"recipe": r}) for r in DDP_RECIPES),
        ("comm_bf16", _ddp_run, {"recipe": "bf16-mixed", "comm": torch.bfloat16}),
        ("comm_fp16", _ddp_run, {"recipe": "fp16-mixed", "comm": torch.float16}),
        ("comm_fp32", _ddp_run, {"recipe": "bf16-mixed", "comm": torch.float32}),
        ("ckpt", _resume, {"strategy": "ddp", "recipe": "fp16-master"}),
        ("fp8", _ddp_fp8, {}),
        ("wire_overflow", _wire_overflow, {}),
    ],
    "fsdp2": [
        ("inf_sharded", _inf_on_rank1, {"fused": False, "strategy": "fsdp2"}),
        ("norm", _sharded_norm, {}),
        ("gpt_bf16-mixed", _fsdp_gpt, {"recipe": "bf16-mixed"}),
        ("gpt_bf16-master", _fsdp_gpt, {"recipe": "bf16-master"}),
        ("ckpt", _resume, {"strategy": "fsdp2", "recipe": "bf16-master"}),
        ("refusals", _refusals, {}),
    ],
}


def _battery(rank: int, name: str, directory: str) -> dict:
    out = {}
    for key, fn, kwargs in _BATTERIES[name]:
        if fn is _resume:
            kwargs = {**kwargs, "directory": os.path.join(directory, f"ckpt-{name}")}
        try:
            out[key] = ("ok", fn(rank, **kwargs))
        except Exception:
            out[key] = ("error", traceback.format_exc())
    return out


def run_battery(label: str, fn, tmp_path_factory, worker_id: str, **kwargs) -> list[dict]:
    """``fn(rank, directory=..., **kwargs)`` on two ranks, once per test session: under
    xdist the first worker to ask runs it and the others read its saved result."""
    if worker_id == "master":  # not under xdist
        return run_on_two_ranks(
            tmp_path_factory.mktemp(label),
            fn,
            directory=str(tmp_path_factory.mktemp(label)),
            **kwargs,
        )
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent
    cache = root / f"distributed-{label}.pt"
    with FileLock(str(cache) + ".lock"):
        if cache.exists():
            return torch.load(cache, weights_only=False)
        work = Path(tempfile.mkdtemp(prefix=f"distributed-{label}-", dir=root))  # fresh store
        results = run_on_two_ranks(work, fn, directory=str(work), **kwargs)
        torch.save(results, cache)
        return results


def _run_battery(name: str, tmp_path_factory, worker_id: str) -> list[dict]:
    return run_battery(name, _battery, tmp_path_factory, worker_id, name=name)


@pytest.fixture(scope="session")
def ddp_battery(tmp_path_factory, worker_id):
    return _run_battery("ddp", tmp_path_factory, worker_id)


@pytest.fixture(scope="session")
def fsdp2_battery(tmp_path_factory, worker_id):
    return _run_battery("fsdp2", tmp_path_factory, worker_id)


def both_ranks(battery: list[dict], key: str) -> tuple:
    """The two ranks' results of scenario ``key``; fails the test with a rank's traceback."""
    for rank, results in enumerate(battery):
        status, value = results[key]
        if status != "ok":
            pytest.fail(f"scenario {key!r} failed on rank {rank}:\n{value}")
    return battery[0][key][1], battery[1][key][1]


# -- rank-consistent loss scaling ---------------------------------------------------------
@pytest.mark.parametrize("key", ["inf_sgd", "inf_fused"])
def test_inf_on_one_rank_skips_onboth_ranks(ddp_battery, key):
    _check_inf_on_one_rank(*both_ranks(ddp_battery, key))


def test_inf_in_one_shard_skips_onboth_ranks(fsdp2_battery):
    _check_inf_on_one_rank(*both_ranks(fsdp2_battery, "inf_sharded"))


def _check_inf_on_one_rank(r0: dict, r1: dict) -> None:
    assert r0["stepped"] == r1["stepped"] == [True, True, False, True, True]
    assert r0["scales"] == r1["scales"]
    assert r0["scales"][2] == r0["scales"][1] * 0.5  # torch preset backs off by 1/2
    assert torch.equal(r0["params"], r1["params"])
    assert not torch.equal(r0["params"], _flat(_tiny_model()))  # the other steps happened


# -- DDP equals one process on the whole batch ---------------------------------------------
# Per-sample math is identical; only the batch reductions in the weight gradients differ
# (two half-batch sums rounded to the compute dtype, then averaged, vs one full-batch sum):
# a few units of the compute dtype's eps on gradients of size ~1, times lr, per step.
_EPS = {"fp16-mixed": 2.0**-11, "bf16-mixed": 2.0**-8, "bf16-master": 2.0**-8}


@pytest.mark.parametrize("recipe", DDP_RECIPES)
def test_ddp_matches_single_process_on_concatenated_batch(ddp_battery, recipe):
    r0, r1 = both_ranks(ddp_battery, f"ddp_{recipe}")
    assert torch.equal(r0, r1)
    reference = _single_process(recipe)
    assert not torch.equal(reference, _flat(_tiny_model()))
    err = (r0 - reference).abs().max().item()
    assert err <= 4 * 0.05 * 4 * _EPS[recipe], err


@pytest.mark.parametrize(
    ("key", "reference", "eps"),
    [("comm_bf16", "ddp_bf16-mixed", 2.0**-8), ("comm_fp16", "ddp_fp16-mixed", 2.0**-11)],
)
def test_low_precision_gradient_communication_matches_fp32(ddp_battery, key, reference, eps):
    low, _ = both_ranks(ddp_battery, key)
    fp32, _ = both_ranks(ddp_battery, reference)
    diff = (low - fp32).abs().max().item()
    # 4 SGD steps of lr 0.05 on gradients of size ~1, each rounded by eps on the wire; the
    # difference is not zero: the hook did round the gradients
    assert 0 < diff <= 4 * 0.05 * 4 * eps, diff


def test_fp16_wire_overflow_is_skipped_and_backed_off_on_both_ranks(ddp_battery):
    r0, r1 = both_ranks(ddp_battery, "wire_overflow")
    assert r0 == r1
    assert not r0["stepped"][0] and r0["stepped"][-1]  # skips until the scale fits fp16
    skipped = r0["stepped"].index(True)
    assert r0["scales"][skipped - 1] == 2.0**24 * 0.5**skipped


def test_fp32_communication_hook_equals_builtin_allreduce(ddp_battery):
    hooked, _ = both_ranks(ddp_battery, "comm_fp32")
    builtin, _ = both_ranks(ddp_battery, "ddp_bf16-mixed")
    assert torch.allclose(hooked, builtin, rtol=0, atol=1e-6)


def test_ddp_with_fp8_linear_keeps_ranks_identical(ddp_battery):
    r0, r1 = both_ranks(ddp_battery, "fp8")
    assert "Float8Linear" in r0["kinds"]
    assert torch.equal(r0["params"], r1["params"])  # different data, all-reduced gradients
    assert not torch.equal(r0["params"], r0["start"])


# -- FSDP2 --------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["bf16-mixed", "bf16-master"])
def test_fsdp2_trains_tiny_gpt(fsdp2_battery, recipe):
    r0, r1 = both_ranks(fsdp2_battery, f"gpt_{recipe}")
    assert r0["losses"] == r1["losses"]
    first, last = sum(r0["losses"][:5]) / 5, sum(r0["losses"][-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert r0["norm"] == r1["norm"] > 0  # clipping norm is global, the same on both ranks
    assert r0["policies"][""] == torch.bfloat16
    assert r0["policies"]["blocks.0.ln1"] is torch.float32  # norms kept fp32


# -- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_checkpoint_resumes_bit_exactly(ddp_battery, fsdp2_battery, strategy):
    results = both_ranks(ddp_battery if strategy == "ddp" else fsdp2_battery, "ckpt")
    for (params, scaler), (params_resumed, scaler_resumed) in results:
        assert torch.equal(params, params_resumed)
        assert str(scaler) == str(scaler_resumed)
    if strategy == "ddp":  # replicated: both ranks hold the same parameters
        assert torch.equal(results[0][0][0], results[1][0][0])


# -- bad input ----------------------------------------------------------------------------
def test_refused_combinations_and_missing_process_group(fsdp2_battery):
    out, _ = both_ranks(fsdp2_battery, "refusals")
    expected = {
        "bf16_storage": ("ValueError", "stored in torch.bfloat16"),
        "wrong_policy": ("ValueError", "param_dtype=torch.bfloat16"),
        "root_not_sharded": ("ValueError", "is not sharded"),
        "bf16_true": ("ValueError", "update='kahan'"),
        "fp16_wire_unscaled": ("ValueError", "flushed to zero"),
        "comm_after_sharding": ("ValueError", "pass grad_comm_dtype to"),
        "no_process_group": ("RuntimeError", "not initialised"),
    }
    assert set(out) == set(expected)
    for name, (kind, phrase) in expected.items():
        assert out[name] is not None, f"{name} was accepted"
        assert out[name][0] == kind and phrase in out[name][1], (name, out[name])


def test_single_process_refusals():
    mpd.check_recipe("fsdp2", get_recipe("fp8-mixed"))  # accepted: see test_distributed_fp8
    with pytest.raises(ValueError, match="neither DistributedDataParallel"):
        model = _tiny_model()
        Precision("bf16-mixed", grad_comm_dtype=torch.bfloat16).setup(
            model, torch.optim.SGD(model.parameters(), lr=0.1)
        )
    with pytest.raises(RuntimeError, match="init_process_group"):
        mpd.shard_model(_tiny_model(), "bf16-mixed")
    with pytest.raises(ValueError, match="torch.float64"):
        mpd.grad_comm_hook(torch.float64)


# The mapping of the README's recipe table onto MixedPrecisionPolicy, written out by hand.
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_POLICIES = {
    "fp32": (None, _F32),
    "tf32": (None, _F32),
    "fp16-mixed": (_F16, _F32),
    "bf16-mixed": (_BF16, _F32),
    "fp16-master": (_F16, _F16),
    "bf16-master": (_BF16, _F32),
    "fp8-mixed": (_BF16, _F32),  # Float8Linear casts the bf16-gathered weight to fp8
}


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_fsdp_policy_per_recipe(name):
    if name not in _POLICIES:
        with pytest.raises(ValueError, match="cannot run under FSDP2"):
            mpd.fsdp_policy(name)
        return
    policy = mpd.fsdp_policy(name)
    assert (policy.param_dtype, policy.reduce_dtype) == _POLICIES[name]
    assert mpd.fsdp_policy(name, grad_comm_dtype=_BF16).reduce_dtype == _BF16


def test_single_process_checkpoint_and_world_size_mismatch(tmp_path):
    model = _tiny_model()
    precision = Precision("bf16-master")
    model, opt = precision.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, precision, opt, _data(2))
    path = mpd.save_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    assert path.name == "rank-00000-of-00001.pt"
    before = _flat(model)
    _train(model, precision, opt, _data(2))
    mpd.load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    assert torch.equal(_flat(model), before)
    # written "by two ranks": replicated state loads on one, with a warning
    moved = path.rename(tmp_path / "rank-00000-of-00002.pt")
    _train(model, precision, opt, _data(2))
    with pytest.warns(UserWarning, match="not bit-exactly"):
        mpd.load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    assert torch.equal(_flat(model), before)
    # a sharded checkpoint of two ranks needs both files; one that does not say its
    # strategy (written before it was recorded) only resumes on its own number of ranks
    from mixprec.distributed.checkpoint import _write, read_checkpoint_file

    state = read_checkpoint_file(moved)
    _write(moved, {**state, "strategy": "fsdp2", "world_size": 2})
    with pytest.raises(FileNotFoundError, match="rank-00001-of-00002.pt"):
        mpd.load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    # a file that does not say its strategy is malformed, whatever the number of ranks
    _write(moved, {k: v for k, v in state.items() if k != "strategy"})
    with pytest.raises(mpd.CheckpointError, match=r"lacks \['strategy'\]"):
        mpd.load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)


def test_example_runs_under_torchrun(tmp_path):
    """examples/train_distributed.py, unchanged, on two gloo ranks launched by torchrun."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port on the loopback interface
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parents[1] / "examples" / "train_distributed.py"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(port), str(script)),
        *("--strategy", "fsdp2", "--recipe", "fp8-mixed", "--grad-comm", "bf16"),
        *("--fp8-all-gather", "--count-bytes"),
        *("--steps", "3", "--log-every", "1", "--checkpoint", str(tmp_path / "ckpt")),
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "fsdp2 on 2 rank(s)" in done.stdout and "val_loss:" in done.stdout
    assert "bytes/step on rank 0: all-gather" in done.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "rank-00000-of-00002.pt",
        "rank-00001-of-00002.pt",
    ]


def test_global_grad_norm_matches_float64_norm():
    grads = [torch.randn(3, 4), torch.randn(0), torch.randn(5)]
    flat = torch.cat([g.flatten() for g in grads]).double()
    assert torch.allclose(mpd.global_grad_norm(grads).double(), flat.norm(), rtol=1e-6)
    assert mpd.global_grad_norm(grads, float("inf")).item() == flat.abs().max().item()


def test_global_grad_norm_spans_fsdp2_shards(fsdp2_battery):
    for result in both_ranks(fsdp2_battery, "norm"):
        assert result["global"] == pytest.approx(result["full"], rel=1e-6)
        assert result["global_inf"] == pytest.approx(result["full_inf"], rel=1e-6)
        assert result["local"] < result["full"]  # one shard alone would under-clip
