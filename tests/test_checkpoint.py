"""Checkpoints are all or nothing: every malformed file gives one clear error, nothing changes."""

from __future__ import annotations

import datetime
import hashlib
import io

import pytest
import torch
from torch import nn

from mixprec import Precision
from mixprec.distributed import CheckpointError, load_checkpoint, save_checkpoint


def _setup(name="bf16-master", width=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.Linear(width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    precision = Precision(name)
    model, opt = precision.setup(model, opt)
    with precision.autocast():
        loss = model(torch.randn(4, 8)).float().square().mean()
    precision.backward(loss)
    precision.step(opt)
    return model, opt, precision


def _snapshot(model, opt, precision):
    return (
        [p.detach().clone() for p in model.parameters()],
        str(opt.state_dict()["state"]),
        str(precision.state_dict()),
    )


def _assert_unchanged(before, model, opt, precision):
    params, opt_state, precision_state = before
    for got, want in zip(model.parameters(), params, strict=True):
        assert torch.equal(got, want)
    assert str(opt.state_dict()["state"]) == opt_state
    assert str(precision.state_dict()) == precision_state


def _rewrap(path, state):
    """Write ``state`` as a well-formed file with a correct digest (to test the layout checks)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = bytearray(buffer.getbuffer())
    torch.save({"format": "mixprec-checkpoint", "version": 1,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(payload, dtype=torch.uint8)}, path)  # fmt: skip


def test_round_trip_reads_back_what_save_accepted(tmp_path):
    model, opt, precision = _setup()
    extra = {"step": 7, "lr": 1e-3, "tag": "run", "raw": b"\x00\x01", "ok": True,
             "none": None, "pos": [1, (2, 3)], "t": torch.arange(3),
             "nested": {"dtype": torch.bfloat16}}  # fmt: skip
    save_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision, extra=extra)
    expected = _snapshot(model, opt, precision)
    fresh = _setup()
    got = load_checkpoint(tmp_path, model=fresh[0], optimizer=fresh[1], precision=fresh[2])
    assert got.keys() == extra.keys() and torch.equal(got.pop("t"), extra["t"])
    assert got == {k: v for k, v in extra.items() if k != "t"}
    _assert_unchanged(expected, *fresh)


def test_save_refuses_what_load_could_not_read(tmp_path):
    model, opt, precision = _setup()
    when = datetime.datetime(2026, 1, 1)
    with pytest.raises(TypeError, match=r"extra\['when'\] is a datetime.*isoformat"):
        save_checkpoint(tmp_path, model=model, optimizer=opt, extra={"when": when})
    assert not list(tmp_path.iterdir())  # nothing written


def _saved(tmp_path, name="bf16-master"):
    model, opt, precision = _setup(name)
    path = save_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    return path, model


def _corrupt_weight_byte(path, model):
    data = bytearray(path.read_bytes())
    weight = model[0].weight.detach().contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(weight[:32])
    assert at > 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path, model: path.write_bytes(b""), "is empty"),
        (lambda path, model: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
         "cannot be read, it is truncated"),
        (lambda path, model: path.write_bytes(b"not a torch file"), "cannot be read"),
        (_corrupt_weight_byte, "cannot be read|is corrupt"),
        (lambda path, model: torch.save({"model": {}}, path), "not a mixprec checkpoint"),
        (lambda path, model: _rewrap(path, {"world_size": 1, "model": {}}),
         r"lacks \['strategy', 'optimizer', 'precision', 'rng', 'extra'\]"),
    ],  # fmt: skip
    ids=["empty", "truncated", "garbage", "flipped-byte", "plain-torch-file", "missing-key"],
)
def test_a_malformed_file_is_one_clear_error_naming_it_and_changes_nothing(
    tmp_path, damage, message
):
    path, saved_model = _saved(tmp_path)
    damage(path, saved_model)
    model, opt, precision = _setup(width=16)
    before = _snapshot(model, opt, precision)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    assert str(path) in str(info.value)
    _assert_unchanged(before, model, opt, precision)


def test_digest_catches_a_flipped_byte_the_container_does_not(tmp_path):
    path, saved_model = _saved(tmp_path)
    state = torch.load(path, weights_only=True)
    payload = state["payload"].clone()
    weight = saved_model[0].weight.detach().contiguous().view(torch.uint8)
    raw = payload.numpy().tobytes()
    at = raw.find(weight.numpy().tobytes()[:32])
    payload[at + 5] ^= 0x40  # one weight changes, the stored digest does not
    state["payload"] = payload
    torch.save(state, path)
    model, opt, precision = _setup()
    before = _snapshot(model, opt, precision)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} is corrupt: the SHA-256"):
        load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    _assert_unchanged(before, model, opt, precision)


@pytest.mark.parametrize(
    "other, message",
    [(("fp16-mixed", 16), "recipe 'bf16-master'"), (("bf16-master", 32), "another model")],
)
def test_another_recipe_or_model_is_refused_before_anything_changes(tmp_path, other, message):
    _saved(tmp_path, "bf16-master")
    model, opt, precision = _setup(*other)
    before = _snapshot(model, opt, precision)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, model=model, optimizer=opt, precision=precision)
    _assert_unchanged(before, model, opt, precision)


def test_precision_state_is_required_when_it_was_saved(tmp_path):
    _saved(tmp_path)
    model, opt, _ = _setup()
    with pytest.raises(CheckpointError, match="pass the Precision"):
        load_checkpoint(tmp_path, model=model, optimizer=opt)


# -- Precision.load_state_dict ------------------------------------------------------------
def test_precision_load_state_dict_of_nothing_names_the_missing_keys():
    _, _, precision = _setup()
    with pytest.raises(ValueError, match=r"lacks \['recipe', 'scaler', 'optimizers'\]"):
        precision.load_state_dict({})
    with pytest.raises(TypeError, match="got str"):
        precision.load_state_dict("state.pt")


def test_precision_state_of_another_model_is_refused_and_changes_nothing():
    saved = _setup(width=16)[2].state_dict()
    model, opt, precision = _setup(width=32)
    before = _snapshot(model, opt, precision)
    with pytest.raises(ValueError, match="other parameter shapes"):
        precision.load_state_dict(saved)
    _assert_unchanged(before, model, opt, precision)


def test_bf16_true_compensation_of_another_model_is_refused():
    saved = _setup("bf16-true", width=16)[2].state_dict()
    _, _, precision = _setup("bf16-true", width=32)
    with pytest.raises(ValueError, match="compensation buffer 0 has shape"):
        precision.load_state_dict(saved)
