from pathlib import Path

import msgspec
import pytest

from contracts.config import ConfigError, JobConfig
from contracts.config.load import check, explain, load_config, to_yaml

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_load_and_pass_checks():
    cfg = load_config()
    # Loading fills the one default that is another field's value; the rest are the tree's own.
    assert cfg.learner.loss_agg_norm_tokens == cfg.rollout.sampling.max_tokens == 16
    assert msgspec.structs.replace(cfg.learner, loss_agg_norm_tokens=None) == JobConfig().learner
    assert msgspec.structs.replace(cfg, learner=JobConfig().learner) == JobConfig()
    check(cfg, cuda_available=False)


def test_a_config_of_an_older_version_reads_with_its_settings_renamed(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("learner:\n  loss_agg: sequence\n")
    assert load_config(old).learner.loss_agg_mode == "seq_mean_token_mean"
    assert load_config(None, ["learner.loss_agg=token"]).learner.loss_agg_mode == "token_mean"


@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.lr_typo=1", "learner.lr_typo: unknown key"),
        ("rollout.sampling.nope=1", "rollout.sampling.nope: unknown key"),
        ("rollout.n_samples=65", "rollout.n_samples: expected int <= 64"),
        ("rollout.n_samples=0", "rollout.n_samples: expected int >= 1"),
        ("rollout.sampling.top_p=1.5", "rollout.sampling.top_p: expected float <= 1.0"),
        ("rollout.engine=sglang", "rollout.engine: invalid enum value 'sglang'"),
        ("learner.lr=abc", "learner.lr: expected float, got str"),
        ("reward.rules=[{weight: 1}]", "reward.rules.0.name: required key missing"),
        ("reward.remote={weight: 2}", "reward.remote.url: required key missing"),
        ("reward.remote={url: 'http://h/s', max_in_flight: 0}", "reward.remote.max_in_flight: expected int >= 1"),
        ("reward.remote={url: 'http://h/s', timeout_s: 0}", "reward.remote.timeout_s: expected float > 0"),
        ("reward.remote={url: 'http://h/s', max_retries: -1}", "reward.remote.max_retries: expected int >= 0"),
        ("reward.remote={url: 'http://h/s', backoff_s: -1}", "reward.remote.backoff_s: expected float >= 0"),
        ("reward.remote={url: 'http://h/s', batch_size: 0}", "reward.remote.batch_size: expected int >= 1"),
        ("reward.remote={url: ''}", "reward.remote.url: expected str of length >= 1"),
    ],
)
def test_bad_values_name_their_path(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_yaml_file_and_overrides_merge(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("learner:\n  lr: 1e-4\n  kl:\n    estimator: k3\nrollout:\n  n_samples: 2\n")
    cfg = load_config(path, ["rollout.n_samples=3", "learner.kl.coef=0.5"])
    assert cfg.learner.lr == 1e-4 and cfg.learner.kl.estimator == "k3" and cfg.learner.kl.coef == 0.5
    assert cfg.rollout.n_samples == 3
    assert cfg.learner.gamma == JobConfig().learner.gamma  # untouched fields keep their defaults


def test_unknown_key_in_file_names_file_and_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("learner:\n  lr_typo: 1\n")
    with pytest.raises(ConfigError, match=r"job.yaml: learner.lr_typo: unknown key"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["learner.lr"])


def test_cross_field_checks_say_what_to_change():
    cfg = load_config(
        None,
        [
            "rollout.prompts_per_iteration=4",
            "rollout.n_samples=2",
            "learner.minibatch_size=16",
            "rollout.num_workers=8",
            "learner.device=cuda",
        ],
    )
    with pytest.raises(ConfigError) as e:
        check(cfg, cuda_available=False)
    text = str(e.value)
    assert "learner.minibatch_size (16) exceeds" in text
    assert "rollout.num_workers (8) exceeds" in text
    assert "learner.device is cuda but no GPU" in text


def test_a_reward_needs_rules_a_model_or_a_server():
    with pytest.raises(
        ConfigError, match="reward: no rules, no model, no server and no learner.teacher; add reward.rules"
    ):
        check(load_config(None, ["reward.rules=[]"]))
    check(load_config(None, ["reward.rules=[]", "reward.remote={url: 'http://scorer:8000/score'}"]))
    check(load_config(None, ["reward.rules=[]", "reward.model={path: /models/rm}"]))


def test_the_reward_server_section_has_its_defaults():
    remote = load_config(None, ["reward.remote.url=http://scorer:8000/score"]).reward.remote
    assert (remote.weight, remote.timeout_s, remote.max_retries, remote.backoff_s) == (1.0, 30.0, 3, 0.5)
    assert (remote.max_in_flight, remote.batch_size) == (4, 64)
    fields = msgspec.inspect.type_info(type(remote)).fields
    # `--explain` prints an optional section as one line, so its fields' docs are checked here.
    assert all(f.type.extra_json_schema["description"] for f in fields)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["learner.lr=0.01", "rollout.sampling.stop=['x']"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_every_field_is_documented():
    lines = explain()
    assert len(lines) > 40
    for line in lines:
        path, _, description = line.partition("  # ")
        assert description.strip(), f"{path} has no description"


@pytest.mark.parametrize("name", ["tiny-arith.yaml", "tiny-arith-smoke.yaml", "cluster-qwen-0.5b.yaml"])
def test_shipped_job_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    check(load_config(path), cuda_available=True)


def test_grafana_dashboard_queries_only_metrics_the_service_exports():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "configs" / "grafana" / "rollout-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"ray_rollout_[a-z_]+", e)}
    source = "".join(p.read_text() for d in ("contracts", "rollout", "learner") for p in (root / d).rglob("*.py"))
    for name in names:
        base = re.sub(r"_(bucket|total)$", "", name.removeprefix("ray_"))
        if base.startswith(
            ("rollout_time_", "rollout_reward_", "rollout_episode_", "rollout_eval_", "rollout_mismatch_")
        ):
            continue  # mirrored from metrics.jsonl keys (time/STAGE, reward/NAME, episode/..., eval/..., mismatch/...)
        key = base.removeprefix("rollout_")
        assert f'"{base}"' in source or f'"{key}"' in source, f"{name} is not exported by rollout/"


def test_a_cluster_too_small_for_the_job_is_an_error_naming_needs_and_means():
    from rollout.driver.resources import check_fits

    cfg = load_config(ROOT_CONFIGS / "tiny-arith-smoke.yaml")
    check_fits(cfg, {"CPU": 3.0})  # 1 rollout worker + 1 learner rank + 0.5 reward worker
    with pytest.raises(ConfigError) as error:
        check_fits(cfg, {"CPU": 2.0})
    text = str(error.value)
    assert (
        "needs 2.5 CPUs (1 rollout worker x 1, 1 reward worker x 0.5, 1 learner rank x 1) and the cluster has 2" in text
    )
    assert "learner.num_cpus_per_rank" in text
    check_fits(load_config(ROOT_CONFIGS / "tiny-arith-smoke.yaml", ["learner.num_cpus_per_rank=0.5"]), {"CPU": 2.0})
    check_fits(load_config(ROOT_CONFIGS / "tiny-arith-smoke.yaml", ["ray.fail_if_short=false"]), {"CPU": 1.0})
    gpus = load_config(None, ["rollout.device=cuda", "rollout.num_workers=4", "learner.device=cuda"])
    with pytest.raises(ConfigError, match="needs 5 GPUs .* the cluster has 4"):
        check_fits(gpus, {"CPU": 64.0, "GPU": 4.0})


@pytest.mark.parametrize(
    "override, field",
    [
        ("learner.lr=inf", "learner.lr"),
        ("learner.lr=.inf", "learner.lr"),
        ("reward.failed_value=nan", "reward.failed_value"),
        ("reward.failed_value=-.inf", "reward.failed_value"),
        ("reward.rules=[{name: length, params: {target: .inf}}]", "reward.rules.0.params.target"),
    ],
)
def test_non_finite_numbers_are_refused_at_load_naming_the_field(override, field):
    # `gt=0` lets inf through, and one inf learning rate makes every weight NaN after the first update.
    with pytest.raises(ConfigError, match=rf"{field}: must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.sampling.temperature=0", "rollout.n_samples=4"], "temperature 0 is greedy decoding"),
        (["rollout.sampling.temperature=0.005"], "below 0.01"),
        (["rollout.sampling.stop=['']"], "stop holds an empty string"),
    ],
)
def test_sampling_settings_the_engine_would_refuse_are_refused_at_start_up(overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check(cfg)


def test_greedy_with_one_sample_and_a_temperature_above_two_are_told_apart():
    check(load_config(None, ["rollout.sampling.temperature=0", "rollout.n_samples=1", "learner.minibatch_size=64"]))
    with pytest.raises(ConfigError, match="rollout.sampling.temperature: expected float <= 2.0"):
        load_config(None, ["rollout.sampling.temperature=3"])


def test_actors_are_checked_node_by_node_where_the_totals_fit():
    from rollout.driver.resources import check_fits, unplaced

    cfg = load_config(
        ROOT_CONFIGS / "tiny-arith-smoke.yaml", ["rollout.num_cpus_per_worker=3", "learner.num_cpus_per_rank=0.5"]
    )  # 3 + 0.5 + 0.5 CPUs
    check_fits(cfg, {"CPU": 4.0})
    check_fits(cfg, {"CPU": 4.0}, nodes={"head": {"CPU": 1.0}, "worker": {"CPU": 3.0}})
    with pytest.raises(ConfigError) as error:
        check_fits(cfg, {"CPU": 4.0}, nodes={"head": {"CPU": 2.0}, "worker": {"CPU": 2.0}})
    assert "no node has room for a rollout worker (3 CPU, 0 GPU)" in str(error.value)
    assert "head 2 CPU / 0 GPU, worker 2 CPU / 0 GPU" in str(error.value)
    # Largest first is not always enough: 3 + 3 + 2 + 2 + 2 on two 6s needs 3 + 3 together.
    requests = [("a", 2, {"CPU": 3.0, "GPU": 0.0}), ("b", 3, {"CPU": 2.0, "GPU": 0.0})]
    assert unplaced(requests, {"x": {"CPU": 6.0}, "y": {"CPU": 6.0}}) is None
    assert unplaced(requests, {"x": {"CPU": 5.0}, "y": {"CPU": 7.0}}) is None
    assert unplaced(requests, {"x": {"CPU": 4.0}, "y": {"CPU": 8.0}}) is None
    assert unplaced(requests, {"x": {"CPU": 1.0}, "y": {"CPU": 11.0}}) == ("b", {"CPU": 2.0, "GPU": 0.0})
    assert (
        unplaced(
            [("gpu rank", 2, {"CPU": 1.0, "GPU": 1.0})], {"x": {"CPU": 8.0, "GPU": 1.0}, "y": {"CPU": 8.0, "GPU": 0.0}}
        )
        is not None
    )


def test_an_episode_and_its_prompt_must_fit_the_engine_together():
    base = ["model.max_prompt_tokens=32", "env.max_episode_tokens=64", "rollout.max_model_len=64"]
    with pytest.raises(ConfigError) as e:
        check(load_config(None, [*base, "env.name=calculator"]))
    assert (
        "model.max_prompt_tokens + env.max_episode_tokens (32 + 64) exceeds rollout.max_model_len (64): "
        "every turn's prompt holds the episode so far; raise max_model_len or lower max_episode_tokens"
    ) in str(e.value)
    check(load_config(None, [*base, "env.name=calculator", "rollout.max_model_len=96"]))
    check(load_config(None, base))  # single-turn rollouts (env.name null) do not play episodes


@pytest.mark.parametrize(
    "override, message",
    [
        ("env.max_turns=0", "env.max_turns: expected int >= 1"),
        ("env.max_episode_tokens=0", "env.max_episode_tokens: expected int >= 1"),
        ("env.step_timeout_s=0", "env.step_timeout_s: expected float > 0"),
        ("env.max_error_fraction=1.5", "env.max_error_fraction: expected float <= 1.0"),
        ("env.num_threads=0", "env.num_threads: expected int >= 1"),
        ("env.observation_role=system", "env.observation_role: invalid enum value 'system'"),
        ("env.params=[1]", "env.params: expected object, got array"),
        ("env.turns=3", "env.turns: unknown key"),
    ],
)
def test_bad_env_values_name_their_path(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_the_env_section_has_its_defaults():
    env = load_config(None, ["env.name=calculator", "env.params={max_calls: 2}"]).env
    assert (env.name, env.params, env.max_turns, env.max_episode_tokens) == ("calculator", {"max_calls": 2}, 4, 256)
    assert (env.step_timeout_s, env.max_error_fraction, env.num_threads, env.observation_role) == (
        10.0,
        0.5,
        256,
        "user",
    )
    assert load_config().env.name is None
