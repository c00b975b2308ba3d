"""A schema v1 archive (written by the v1 code path: tests/data/archive-v1) reads, stats and replays as v1 did."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from contracts.schema import SCHEMA_VERSION, archive_schema
from rollout.archive import iter_batches, read_metadata, read_schema, read_table
from rollout.offline.replay import ReplayOptions, replay
from rollout.offline.stats import compute_stats

FIXTURE = Path(__file__).parent / "data" / "archive-v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
REPLAYS = {
    "gae": ReplayOptions(),
    "kl_coef_0.2": ReplayOptions(kl_coef=0.2),
    "grpo": ReplayOptions(estimator="grpo"),
    "reinforce_pp": ReplayOptions(estimator="reinforce_pp"),
}


def close(a, b, tol=1e-5):
    """Equal, or within `tol` (absolute and relative) for floats, through nested lists and dicts."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and b is not None:
        return abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


@pytest.fixture()
def archive(tmp_path):
    run = tmp_path / "v1"
    shutil.copytree(FIXTURE, run)  # replays write next to nothing of the fixture's, but stay off the repo
    return run


def test_v1_files_read_as_schema_v2(archive):
    assert read_metadata(archive)["schema_version"] == "1"
    schema = read_schema(archive)
    assert schema.equals(archive_schema(["arithmetic", "length"]))
    table = read_table(archive)
    assert table.num_rows == 32 and table.schema.remove_metadata().equals(schema)
    components = table["reward_components"].to_pylist()
    assert all(set(c) == {"arithmetic", "length"} for c in components)
    # kl_t = −(r_t − [t last]·score) / β, β per iteration from metrics.jsonl (adaptive controller).
    metrics = [json.loads(line) for line in (FIXTURE / "metrics.jsonl").read_text().splitlines()]
    assert table["kl_coef"].to_pylist() == pytest.approx([0.05] * 16 + [metrics[0]["kl_coef"]] * 16)
    for row in table.to_pylist():
        rebuilt = -row["kl_coef"] * np.array(row["kl"])
        rebuilt[-1] += row["reward"]
        assert rebuilt == pytest.approx(row["token_rewards"], abs=1e-6)


def test_v1_stats_as_v1_computed_them(archive):
    stats = compute_stats(archive).to_json()
    stats["archive"] = None
    # Figures added since v1 (restarts) are left out: every figure v1 computed is compared.
    stats["iterations"] = [
        {k: it[k] for k in want} for it, want in zip(stats["iterations"], EXPECTED["stats"]["iterations"])
    ]
    stats["totals"] = {k: stats["totals"][k] for k in EXPECTED["stats"]["totals"]}
    assert close(stats, EXPECTED["stats"]), (stats, EXPECTED["stats"])


@pytest.mark.parametrize("name", list(REPLAYS))
def test_v1_replays_as_v1_computed_them(archive, tmp_path, name):
    report = replay(archive, tmp_path / "out", REPLAYS[name])
    expected = EXPECTED[f"replay/{name}"]
    assert close(report.max_return_diff, expected["max_return_diff"])
    table = read_table(tmp_path / "out")
    for column in ("reward", "token_rewards", "advantages", "returns"):
        assert close(table[column].to_pylist(), expected[column]), column
    assert read_metadata(tmp_path / "out")["schema_version"] == str(
        SCHEMA_VERSION
    )  # a replay writes the current schema


def test_a_v1_batch_without_its_runs_metrics_has_no_kl(tmp_path):
    """An adaptive run's coefficient after the first iteration is known only from metrics.jsonl."""
    shutil.copytree(FIXTURE / "rollouts", tmp_path / "rollouts")
    table = read_table(tmp_path)
    second = pa.compute.equal(table["iteration"], 1)
    assert table.filter(second)["kl"].null_count == 16 and table.filter(second)["kl_coef"].null_count == 16
    assert compute_stats(tmp_path).iterations[1]["kl"] is None
    assert sum(b.num_rows for b in iter_batches(tmp_path)) == 32
