"""A model file cannot run code: checkpoints load with torch.load(weights_only=True)."""

from __future__ import annotations

import pytest
import torch

from cbir.models.hasher import Hasher


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch EVIL_RAN",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "cbir-hasher/1", "payload": _Evil()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a readable cbir checkpoint"):
        Hasher.load(tmp_path / "model.pt", device="cpu")
    assert not (tmp_path / "EVIL_RAN").exists()
