"""``--resume`` (cbir.engine): a run stopped by its time budget has nothing left to train, and a
changed flag is named with its old and new values."""

from __future__ import annotations

import logging

import pytest
from _tiny import TINY

from cbir.engine import TrainConfig, config_changes, train
from cbir.models.hasher import Hasher


def _cfg(out, **kw):
    base = dict(TINY, method="ce", epochs=20, max_steps_per_epoch=3, lr=3e-3, seed=2, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def test_resume_of_a_run_stopped_by_its_time_budget_trains_no_step_and_writes_the_same_model(tmp_path, caplog):
    first = train(_cfg(tmp_path, time_budget_s=1e-3))  # stops after its first step
    assert first.config["time_budget_hit"] and first.config["steps"] == 1
    state = (tmp_path / "train_state.pt").read_bytes()
    (tmp_path / "model.pt").unlink()
    with caplog.at_level(logging.INFO, logger="cbir.train"):
        again = train(_cfg(tmp_path, time_budget_s=1e-3, resume=True))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "nothing left to train" in r.getMessage()]
    assert warned and "time budget of 0 s after 1 steps (epoch 1 of 20)" in warned[0].getMessage()
    # no step at lr 0 (it would move the BatchNorm statistics): the same steps, model and state
    assert again.config["steps"] == 1 and again.config["time_budget_hit"]
    assert again.history == first.history
    assert Hasher.load(tmp_path / "model.pt").content_hash == first.hasher.content_hash
    assert (tmp_path / "train_state.pt").read_bytes() == state


def test_resume_with_a_changed_flag_names_each_field_with_old_and_new_values(tmp_path):
    train(_cfg(tmp_path, epochs=1, max_steps_per_epoch=1))
    with pytest.raises(ValueError) as e:
        train(_cfg(tmp_path, epochs=2, max_steps_per_epoch=1, lr=1e-3, params={"multilabel_loss": "asl"}, resume=True))
    msg = str(e.value)
    assert (
        "was written by a different config (epochs: 1 -> 2; lr: 0.003 -> 0.001; params.multilabel_loss: (not set) -> 'asl')"
        in msg
    )
    assert "rerun with the old values" in msg
    # fields that do not change the run (threads, progress, out...) are not compared
    again = train(_cfg(tmp_path, epochs=1, max_steps_per_epoch=1, threads=2, resume=True))
    assert again.config["steps"] == 1


def test_config_changes_lists_every_difference():
    old = {"a": 1, "b": {"x": 1, "y": 2}, "c": None}
    new = {"a": 1, "b": {"x": 1, "y": 3, "z": 4}, "d": "new"}
    assert config_changes(old, new) == [
        "b.y: 2 -> 3",
        "b.z: (not set) -> 4",
        "c: None -> (not set)",
        "d: (not set) -> 'new'",
    ]
    assert config_changes(old, dict(old)) == []
