"""The typed config tree: YAML + dotted overrides, validation naming the field, resolved
config written and re-loadable, every field documented with a unit."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, PrimeRunConfig, describe_fields, load_config, render_markdown, save_resolved

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PrimeRunConfig)


def test_defaults_are_the_papers():
    c = PrimeRunConfig()
    assert (c.prime.beta, c.prime.prm_update, c.prime.process_baseline, c.prime.prime_norm) == (
        0.05, "after", "official", "batch_norm")
    assert (c.prime.filter_low, c.prime.filter_high, c.generation.k) == (0.2, 0.8, 4)
    assert (c.loss.clip_eps, c.optim.policy.lr, c.optim.prm.lr) == (0.2, 5e-7, 1e-6)
    assert (c.optim.policy.grad_clip, c.optim.prm.grad_clip, c.optim.prm.weight_decay) == (1.0, 10.0, 0.0)


def test_yaml_then_overrides_win():
    cfg = load_config(TINY, ["prime.beta=0.1", "async.max_staleness=3", "optim.prm.lr=2e-6", "loss.correction=mask"])
    assert cfg.prime.beta == 0.1 and cfg.async_.max_staleness == 3
    assert cfg.optim.prm.lr == 2e-6 and cfg.loss.correction == "mask"
    assert cfg.generation.max_tokens == 48  # from the YAML, not the default 3072


@pytest.mark.parametrize(
    "override, field",
    [
        ("prime.beta=-1", "prime.beta"),
        ("prime.beta=abc", "prime.beta"),
        ("generation.k=2.5", "generation.k"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("loss.correction=tis", "loss.correction"),
        ("prime.prm_update=sometimes", "prime.prm_update"),
        ("async.max_staleness=-1", "async.max_staleness"),
        ("optim.policy.betas=[0.9,1.0]", "optim.policy.betas"),
        ("prime.filter_low=0.9", "prime.filter_low"),
        ("batch.policy_mini_batch=7", "batch.policy_mini_batch"),
        ("generation.k=1", "generation.k"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(TINY, [override])


@pytest.mark.parametrize("overrides, fields", [
    (["generation.top_p=0.9"], ["generation.top_p", "biased"]),  # the learner has no nucleus
    (["generation.engine=vllm-async", "loss.correction=none"], ["vllm-async", "loss.correction"]),
    (["loss.kl_coef=0.1", "model.ref=policy_old"], ["loss.kl_coef", "model.ref"]),
    (["run.deterministic=true", "actors.num=2"], ["run.deterministic", "actors.num"]),
    (["run.deterministic=true", "async.max_staleness=2", "async.actor_lag=1"], ["async.actor_lag"]),
    (["prime.prm_update=none"], ["prime.prm_update", "model.prm_path", "outcome-only"]),  # PRM = reference
    (["prime.prm_update=none", "model.prm_path=m/sft", "model.ref_path=m/./sft"], ["model.ref_path"]),
    (["prime.process_credit=min", "prime.process_gamma=0"], ["prime.process_gamma", "prime.process_credit"]),
])
def test_silent_combinations_are_refused_naming_the_fields(overrides, fields):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    for f in fields:
        assert f in str(e.value), str(e.value)
    load_config(TINY, ["generation.engine=vllm-async", "loss.correction=truncate"])  # the fixed forms load
    load_config(TINY, ["loss.kl_coef=0.1"])
    load_config(TINY, ["prime.prm_update=none", "model.prm_path=runs/x/final_prm"])  # a trained PRM
    load_config(TINY, ["prime.prm_update=none", "prime.use_process_rewards=false"])  # outcome-only on purpose
    assert load_config(TINY, ["prime.process_gamma=0"]).prime.process_gamma == 0.0


@pytest.mark.parametrize("override, field", [("prime.bta=0.1", "prime.bta"), ("nosuch.key=1", "nosuch")])
def test_unknown_keys_fail(override, field):
    with pytest.raises(ConfigError, match=re.escape(field) + ".*not permitted"):
        load_config(TINY, [override])


def test_unknown_key_in_yaml_fails(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prime:\n  beta: 0.05\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"prime\.betta"):
        load_config(p)


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(TINY, ["prime.beta"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_config(p)


def test_base_chain_file_keys_win_and_loops_are_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(f"base: {TINY}\nprime: {{beta: 0.3}}\neval: {{samples: 6}}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: ../root.yaml\nprime: {beta: 0.2}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", ["eval.samples=2"])
    # leaf beats root, root beats tiny.yaml, the override beats them all, tiny.yaml fills the rest
    assert (cfg.prime.beta, cfg.eval.samples, cfg.generation.max_tokens) == (0.2, 2, 48)
    assert load_config(tmp_path / "sub" / "leaf.yaml").eval.samples == 6
    assert "base" not in cfg.to_dict()
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="'base' must be"):
        load_config(tmp_path / "d.yaml")


def test_variants_change_only_what_they_say():
    tiny, long = load_config(TINY).to_dict(), load_config(ROOT / "configs" / "tiny-long.yaml").to_dict()
    diff = {f"{s}.{k}" for s in tiny for k in tiny[s] if tiny[s][k] != long[s][k]}
    assert diff == {"run.output_dir", "task.steps", "generation.max_tokens", "warmup.max_new_tokens"}
    weak = load_config(ROOT / "configs" / "tiny-weak.yaml").to_dict()
    assert {f"{s}.{k}" for s in tiny for k in tiny[s] if tiny[s][k] != weak[s][k]} == {"run.output_dir", "warmup.max_steps"}


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(TINY, ["prime.beta=0.125", "async.max_staleness=4"])
    out = save_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml"
    text = out.read_text()
    assert "async:" in text and "async_" not in text
    again = load_config(out)
    assert again == cfg and again.prime.beta == 0.125


def test_every_field_documented_with_unit():
    rows = describe_fields()
    assert len(rows) > 50
    for name, _typ, _default, desc in rows:
        assert re.search(r"\[[^\]]+\]$", desc), f"{name} lacks a description ending in [unit]"
    names = {r[0] for r in rows}
    for required in ["model.policy_path", "generation.k", "generation.temperature", "generation.top_p",
                     "generation.max_tokens", "prime.beta", "prime.prm_update", "prime.process_baseline",
                     "prime.prime_norm", "prime.filter_low", "prime.filter_high", "loss.clip_eps",
                     "loss.correction", "loss.is_cap", "optim.policy.lr", "optim.prm.lr",
                     "batch.prompts_per_step", "async.max_staleness", "transport.trajectory_addr",
                     "logging.tensorboard", "checkpoint.every"]:
        assert required in names


def test_docs_config_md_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == render_markdown(), "run: python launch/config_docs.py"


def test_launcher_rejects_bad_override_with_field_name():
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "prime.beta=-3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "prime.beta" in r.stderr


def test_run_py_resume_reads_the_run_directorys_saved_config(tmp_path):
    """``launch/run.py --resume DIR``: DIR's config.yaml, in DIR, resuming, overrides on top;
    a directory without one is refused."""
    import importlib.util

    from common.config import save_resolved

    spec = importlib.util.spec_from_file_location("launch_run", Path(__file__).resolve().parents[2] / "launch" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    run_dir = tmp_path / "interrupted"
    save_resolved(load_config(TINY, ["prime.beta=0.2", "run.steps=30", f"run.output_dir={tmp_path / 'elsewhere'}"]),
                  run_dir)
    cfg, _ = run.parse(["--resume", str(run_dir), "--steps", "40"])
    assert cfg.checkpoint.resume and cfg.run.output_dir == str(run_dir)
    assert cfg.prime.beta == 0.2 and cfg.run.steps == 40
    with pytest.raises(SystemExit) as e:
        run.parse(["--resume", str(tmp_path / "nothing")])
    assert e.value.code == 2


def test_old_key_actors_threads_is_read_as_placement_actor_threads():
    """Resolved configs of runs before the rename still load (tools like benchmarks/credit.py
    read them); giving both names with different values is an error."""
    assert load_config(None, ["actors.threads=3"]).placement.actor_threads == 3
    assert load_config(None, ["actors.threads=2", "placement.actor_threads=2"]).placement.actor_threads == 2
    with pytest.raises(ConfigError, match="old name"):
        load_config(None, ["actors.threads=2", "placement.actor_threads=1"])
