"""learner/checkpoint.py: atomic last-k checkpoints, safe loading, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from learner.checkpoint import (bytes_to_tensor, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state, tensor_to_bytes)


def test_last_k_and_atomic(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # a crash mid-write leaves a temp dir that is never taken for a checkpoint
    (tmp_path / ".tmp_step_00000004").mkdir()
    assert load_checkpoint(tmp_path)["step"] == 3
    assert torch.equal(load_checkpoint(tmp_path / "step_00000002")["w"], torch.full((3,), 2.0))


def test_rng_round_trip_and_bytes(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path, 0, {"rng": rng_state(), "buf": [bytes_to_tensor(b"\x00ab\xff")]})
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    s = load_checkpoint(tmp_path)
    set_rng_state(s["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
    assert tensor_to_bytes(s["buf"][0]) == b"\x00ab\xff"


class Evil:  # any class: loading it would mean unpickling arbitrary objects
    pass


def test_refuses_pickled_objects(tmp_path):
    d = tmp_path / "step_00000001"
    d.mkdir()
    torch.save({"x": Evil()}, d / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only|Unsupported global"):
        load_checkpoint(tmp_path)
