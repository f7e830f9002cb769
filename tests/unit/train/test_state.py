"""The loop's state and its periodic actions, without a process group."""
from __future__ import annotations

import pytest
import torch

from defect_ds.train.monitors import Every, FiniteCheck, ProfilerWindow, TrainingDiverged
from defect_ds.train.state import TrainState


def test_train_state_round_trips_and_ignores_other_client_state():
    state = TrainState(step=4, micro_step=8, epoch=1, batch_in_epoch=2, samples_replaced=3, samples_padded=5)
    loaded = TrainState()
    loaded.load_state_dict({**state.state_dict(), "rng": object(), "base_fingerprint": "abc"})
    assert loaded == state and loaded is not state


def test_train_state_reads_checkpoints_written_before_it():
    old = {"step": 4, "micro_step": 8, "epoch": 1, "batch_in_epoch": 2, "data_counts": [3, 5], "rng": {}}
    loaded = TrainState()
    loaded.load_state_dict(old)
    assert loaded == TrainState(step=4, micro_step=8, epoch=1, batch_in_epoch=2, samples_replaced=3, samples_padded=5)
    del old["data_counts"]  # older still: no data counts at all
    loaded.load_state_dict(old)
    assert (loaded.samples_replaced, loaded.samples_padded) == (0, 0)
    with pytest.raises(KeyError):
        TrainState().load_state_dict({"step": 1})


def test_every_is_due_on_multiples_and_at_the_last_step():
    calls = []
    action = Every(3, lambda step, state: calls.append((step, state.step)), last_step=7)
    assert [s for s in range(1, 10) if action.due(s)] == [3, 6, 7, 9]
    assert [s for s in range(1, 10) if Every(0, print).due(s)] == []
    action.run(3, TrainState(step=3))
    assert calls == [(3, 3)]


def test_finite_check_is_due_before_the_actions_it_guards_and_stops_on_a_nan(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    check = FiniteCheck(torch.device("cpu"), lambda what, step: f"{what} at {step}",
                        before=(Every(2, print), Every(5, print)))
    assert [s for s in range(1, 11) if check.due(s)] == [2, 4, 5, 6, 8, 10]
    check.observe(torch.tensor(1.0))
    check.run(2, TrainState(step=2))  # finite: nothing happens
    check.observe(torch.tensor(float("nan")))
    check.observe(torch.tensor(1.0))  # a later finite loss does not clear it
    with pytest.raises(TrainingDiverged, match="loss at 4"):
        check.run(4, TrainState(step=4))


def test_profiler_window_is_due_where_it_opens_and_closes(tmp_path):
    lines = []
    window = ProfilerWindow(2, 2, 10, tmp_path / "trace.json", torch.device("cpu"), lines.append)
    due = []
    for step in range(0, 6):
        if window.due(step):
            due.append(step)
            window.run(step, TrainState(step=step))
    assert due == [1, 3] and (tmp_path / "trace.json").is_file() and "steps 2..3" in lines[0]
    assert not any(ProfilerWindow(0, 2, 10, tmp_path / "x.json", torch.device("cpu"), print).due(s) for s in range(5))
