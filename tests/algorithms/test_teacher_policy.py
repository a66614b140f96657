"""Teacher-weight policy: live, frozen_sync, ema, separate; checkpoint round trip."""

import pytest
import torch

from rlsd_megatron.algorithms import TeacherWeightPolicy


def _params(value: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((2, 2), value, dtype=dtype), "layer.bias": torch.full((2,), value, dtype=dtype)}


def test_live_and_separate_hold_nothing():
    for mode, source in (("live", "student"), ("separate", "separate")):
        policy = TeacherWeightPolicy(mode)
        policy.initialize(_params(0.0))
        assert policy.source == source and not policy.holds_copy
        assert policy.on_step(1, _params(1.0)) is False
        assert policy.teacher_state() is None
        assert policy.state_dict()["weights"] == {}


def test_frozen_sync_refreshes_after_every_nth_update():
    policy = TeacherWeightPolicy("frozen_sync", sync_interval=2)
    policy.initialize(_params(0.0))
    seen = []
    for step in range(1, 6):  # the student after update `step` has weights == step
        changed = policy.on_step(step, _params(float(step)))
        seen.append((changed, policy.teacher_state()["layer.weight"][0, 0].item()))
    # Initial copy 0 until update 2; then 2 until update 4; then 4.
    assert seen == [(False, 0.0), (True, 2.0), (False, 2.0), (True, 4.0), (False, 4.0)]
    assert policy.last_sync_step == 4


def test_frozen_sync_copy_is_independent_of_student():
    student = _params(1.0)
    policy = TeacherWeightPolicy("frozen_sync")
    policy.initialize(student)
    student["layer.weight"].add_(5.0)  # an optimizer step mutating the student in place
    assert policy.teacher_state()["layer.weight"][0, 0].item() == 1.0


def test_ema_hand_values():
    # rate 0.5: 0 → 0.5·0 + 0.5·1 = 0.5 → 0.5·0.5 + 0.5·1 = 0.75.
    policy = TeacherWeightPolicy("ema", ema_rate=0.5)
    policy.initialize(_params(0.0))
    policy.on_step(1, _params(1.0))
    policy.on_step(2, _params(1.0))
    assert policy.teacher_state()["layer.bias"].tolist() == [0.75, 0.75]
    # SDPO's rate 0.05: 0 → 0.05 → 0.05·0.95 + 0.05 = 0.0975.
    policy = TeacherWeightPolicy("ema")
    policy.initialize(_params(0.0))
    policy.on_step(1, _params(1.0))
    policy.on_step(2, _params(1.0))
    assert policy.teacher_state()["layer.bias"][0].item() == pytest.approx(0.0975, abs=1e-7)


def test_ema_keeps_float32_for_bf16_students():
    # bf16 spacing near 1 is 2^-7: 1 + 0.05·2^-7 = 1.000390625 would round back to 1 in bf16.
    policy = TeacherWeightPolicy("ema")
    policy.initialize(_params(1.0, torch.bfloat16))
    policy.on_step(1, _params(1.0078125, torch.bfloat16))
    state = policy.teacher_state()["layer.weight"]
    assert state.dtype == torch.float32
    assert state[0, 0].item() == pytest.approx(1.000390625, abs=1e-7)


def test_storage_is_updated_in_place():
    # The copy may live in existing tensors, e.g. a separate teacher module's parameters.
    storage = _params(-1.0)
    policy = TeacherWeightPolicy("frozen_sync", sync_interval=1)
    policy.initialize(_params(3.0), storage=storage)
    assert storage["layer.weight"][0, 0].item() == 3.0
    policy.on_step(1, list(_params(4.0).items()))  # named_parameters()-style iterables work too
    assert storage["layer.bias"][0].item() == 4.0 and policy.teacher_state()["layer.bias"] is storage["layer.bias"]


def test_state_dict_round_trip_and_errors():
    policy = TeacherWeightPolicy("ema", ema_rate=0.5)
    policy.initialize(_params(0.0))
    policy.on_step(1, _params(1.0))
    state = policy.state_dict()

    resumed = TeacherWeightPolicy("ema", ema_rate=0.5)
    resumed.initialize(_params(9.0))  # the resumed student; the checkpoint must win
    resumed.load_state_dict(state)
    assert resumed.last_sync_step == 1 and resumed.teacher_state()["layer.weight"][0, 0].item() == 0.5
    resumed.on_step(2, _params(1.0))
    assert resumed.teacher_state()["layer.weight"][0, 0].item() == 0.75

    fresh = TeacherWeightPolicy("ema", ema_rate=0.5)  # not initialised: cloned from the checkpoint
    fresh.load_state_dict(state)
    assert fresh.teacher_state()["layer.bias"][0].item() == 0.5

    with pytest.raises(ValueError, match="teacher mode"):
        TeacherWeightPolicy("frozen_sync").load_state_dict(state)
    with pytest.raises(ValueError, match="differ"):
        resumed.on_step(3, {"other": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="initialize"):
        TeacherWeightPolicy("frozen_sync").on_step(1, _params(0.0))
    with pytest.raises(ValueError, match="not one of"):
        TeacherWeightPolicy("stale")


def test_frozen_never_changes():
    policy = TeacherWeightPolicy("frozen")
    policy.initialize(_params(1.0))
    for step in range(1, 50):
        assert not policy.on_step(step, _params(float(step)))
    assert all(torch.equal(t, _params(1.0)[n]) for n, t in policy.teacher_state().items())
