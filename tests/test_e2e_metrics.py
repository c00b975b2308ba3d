"""End to end, the dashboards: a running job's Ray metrics endpoint, and every Grafana panel query
evaluated by a real Prometheus. A module of its own, so the job they watch ends with them."""

import json
import subprocess
import sys
import time

import pytest
from e2e_common import ROOT, free_port

CALC = ROOT / "configs" / "tiny-calc.yaml"

sys.path.insert(0, str(ROOT / "benchmarks"))

from job_process import RolloutProcess, run_args  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


@pytest.fixture(scope="module")
def live_job(tmp_path_factory):
    """A job that keeps running (no checkpoints) with its Ray metrics on a known port; killed at the end. It
    plays calculator episodes (configs/tiny-calc.yaml, whose SFT warm-up test_e2e_episodes.py has cached), so
    the episode panels have data as well as the rest, which single completions fill alike."""
    port = free_port()
    out = tmp_path_factory.mktemp("live") / "run"
    settings = (
        "iterations=100000",
        "checkpoint_every=100000",
        "rollout.prompts_per_iteration=16",
        "eval.prompts=builtin:calc",  # the held-out evaluation's panel
        "eval.every=2",
        "eval.max_prompts=8",
        f"ray.metrics_export_port={port}",
    )
    with RolloutProcess(run_args(out, *settings, config=CALC), out.with_suffix(".log")) as job:
        yield job, port


def test_project_metrics_appear_on_the_local_ray_prometheus_endpoint(live_job):
    import urllib.request

    proc, port = live_job
    wanted = {
        "ray_rollout_tokens_per_s",
        "ray_rollout_reward_mean",
        "ray_rollout_kl",
        "ray_rollout_worker_generated_tokens_total",
        "ray_rollout_stage_seconds_bucket",
        "ray_rollout_queue_depth",
        "ray_rollout_version_lag",
        "ray_rollout_behaviour_logprob_mismatch",
        "ray_rollout_env_step_seconds_bucket",
        "ray_rollout_episode_prefix_cached_fraction",
    }
    found: set[str] = set()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not wanted <= found:
        time.sleep(2)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        found |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_rollout")}
    assert proc.poll() is None, f"the run exited ({proc.poll()}) before its metrics were all seen"
    assert wanted <= found, f"missing from the endpoint: {sorted(wanted - found)}"


def dashboard_queries():
    dashboard = json.loads((ROOT / "configs" / "grafana" / "rollout-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_panel_query_returns_data_from_a_real_prometheus(live_job, tmp_path):
    """Debian's prometheus scrapes the running job's Ray endpoint; each panel's query, evaluated by
    Prometheus' HTTP API, must return series. (`make test` installs the package where it can.)"""
    import shutil
    import urllib.parse
    import urllib.request

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: install Debian's package (apt-get install prometheus) to run this test")
    proc, port = live_job
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n"
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),
    )
    queries = dashboard_queries()
    results: dict[str, list] = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and server.poll() is None:
            for title, expr in queries:
                if results.get(expr):
                    continue
                url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                try:
                    answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
                except OSError:
                    break  # not up yet
                assert answer["status"] == "success", (title, expr, answer)
                results[expr] = answer["data"]["result"]
            if all(results.get(expr) for _, expr in queries):
                break
            time.sleep(2)
    finally:
        server.kill()
        server.wait()
    assert proc.poll() is None and server.returncode in (None, -9), (tmp_path / "prometheus.log").read_text()[-2000:]
    empty = [f"{title}: {expr}" for title, expr in queries if not results.get(expr)]
    assert not empty, "panel queries with no data:\n" + "\n".join(empty)
