"""gloo weight sync straight into the vLLM engine's workers (``VLLMEngine.join_weight_sync`` /
``load_synced_weights`` through the worker extension): no file, no copy through the actor
process. After an update the engine's log-probs equal the learner's recomputation with the
new weights (tied head included); an update that is not newer than the engine's version (a
restarted learner resuming at an older one) is received but not loaded."""

import pytest

from actors.engines import make_engine
from common.weight_sync import make_sender
from synthetic import free_port
from test_engines import TINY_PROMPTS, mean_abs_diff, perturbed, tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_vllm_workers_take_gloo_weights_in_place(tmp_path):
    reference = tiny_qwen2(tmp_path / "model", tied=True)
    addr = f"127.0.0.1:{free_port()}"
    sender = make_sender("gloo", addr=addr, timeout_s=30, connect_timeout_s=120)
    engine = make_engine("vllm", tmp_path / "model", max_model_len=256, seed=0)
    try:
        assert engine.in_engine_sync
        engine.join_weight_sync("gloo", addr, timeout_s=30, connect_timeout_s=120, label="vllm-test")
        new = perturbed(reference, 0.02, seed=7)
        sender.send(new.state_dict(), 1)  # to the worker, or by catch-up when it finishes joining
        assert engine.load_synced_weights(timeout_s=60) == 1 and engine.policy_version == 1
        out = engine.generate(TINY_PROMPTS, k=3, temperature=0.7, max_tokens=24, seed=1)
        assert all(s.policy_version == 1 for g in out for s in g)
        assert mean_abs_diff(new, TINY_PROMPTS, out, 0.7) < 1e-3  # the new weights, tied head included
        assert mean_abs_diff(reference, TINY_PROMPTS, out, 0.7) > 1e-2  # not the old ones
        # a restarted learner resuming at an older version: received, not loaded
        sender.close()
        sender = make_sender("gloo", addr=addr, timeout_s=30, connect_timeout_s=120, num_receivers=1)
        sender.send(reference.state_dict(), 0)
        assert engine.load_synced_weights(timeout_s=60) == 1
        again = engine.generate(TINY_PROMPTS, k=3, temperature=0.7, max_tokens=24, seed=1)
        assert mean_abs_diff(new, TINY_PROMPTS, again, 0.7) < 1e-3
    finally:
        engine.close()
        sender.close()
