"""The Arrow archive: schema v2, round trip, streaming writes, a file cut by a crash, other readers."""

import datetime as dt
import math

import msgspec
import pyarrow as pa
import pytest

from contracts.schema import RolloutRecord, archive_schema, from_record_batch, to_record_batch
from rollout.archive import (
    ArchiveCutWarning,
    ArchiveWriter,
    archive_files,
    iter_batches,
    read_metadata,
    read_schema,
    read_table,
)

COMPONENTS = ("arithmetic", "format")
ARCHIVE_SCHEMA = archive_schema(COMPONENTS)

DESIGN_COLUMNS = {
    "run_id": pa.string(),
    "prompt_id": pa.string(),
    "iteration": pa.int32(),
    "policy_version": pa.int32(),
    "sample_index": pa.int32(),
    "prompt": pa.string(),
    "response": pa.string(),
    "prompt_ids": pa.list_(pa.int32()),
    "response_ids": pa.list_(pa.int32()),
    "response_logprobs": pa.list_(pa.float32()),
    "ref_logprobs": pa.list_(pa.float32()),
    "values": pa.list_(pa.float32()),
    "kl": pa.list_(pa.float32()),
    "kl_coef": pa.float32(),
    "token_rewards": pa.list_(pa.float32()),
    "reward": pa.float32(),
    "reward_components": pa.struct([("arithmetic", pa.float32()), ("format", pa.float32())]),
    "advantages": pa.list_(pa.float32()),
    "returns": pa.list_(pa.float32()),
    "finish_reason": pa.string(),
    "worker": pa.string(),
    # Version 3: episodes, and whether the update used the sample.
    "response_mask": pa.list_(pa.uint8()),
    "num_turns": pa.int32(),
    "final_turn": pa.string(),
    "turn_reward_at": pa.list_(pa.int32()),
    "turn_rewards": pa.list_(pa.float32()),
    "env_error": pa.string(),
    "trained": pa.bool_(),
    # Version 4: where the weights changed in a sample (partial rollouts), an agent episode's segments.
    "policy_version_last": pa.int32(),
    "resumed_at": pa.list_(pa.int32()),
    "resumed_versions": pa.list_(pa.int32()),
    "episode_id": pa.string(),
    "segment": pa.int32(),
}


def make_records(n, iteration=0, learner=True):
    out = []
    for i in range(n):
        t = 1 + i % 5
        rec = RolloutRecord(
            run_id="run",
            prompt_id=f"p{i // 4}",
            iteration=iteration,
            policy_version=iteration,
            sample_index=i % 4,
            prompt=f"<s>{i}+1=",
            response=str(i + 1),
            prompt_ids=[1, 2, 3],
            response_ids=list(range(10, 10 + t)),
            response_logprobs=[-0.5] * t,
            finish_reason="stop",
            worker="rollout-0",
            generated_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
            reward=1.0,
            reward_components={"arithmetic": 1.0, "format": float("nan")},
        )
        if learner:
            rec.ref_logprobs = rec.values = rec.kl = rec.token_rewards = rec.advantages = rec.returns = [0.25] * t
            rec.kl_coef = 0.05
        out.append(rec)
    return out


def test_schema_has_every_design_column_with_its_type():
    for name, kind in DESIGN_COLUMNS.items():
        assert ARCHIVE_SCHEMA.field(name).type == kind, name
    assert ARCHIVE_SCHEMA.field("generated_at").type == pa.timestamp("us", tz="UTC")
    assert set(ARCHIVE_SCHEMA.names) == set(DESIGN_COLUMNS) | {"generated_at"}
    # The record type maps 1:1 to the schema.
    assert {f.name for f in msgspec.structs.fields(RolloutRecord)} == set(ARCHIVE_SCHEMA.names)


def test_round_trip_keeps_every_field(tmp_path):
    records = make_records(10)
    with ArchiveWriter(tmp_path, {"gamma": "1.0", "lam": "0.95"}, COMPONENTS, batch_rows=4) as w:
        w.write(records)
    back = [r for b in iter_batches(tmp_path) for r in from_record_batch(b)]
    assert len(back) == 10
    for a, b in zip(records, back):
        assert b.response_ids == a.response_ids and b.prompt_id == a.prompt_id
        assert b.reward_components["arithmetic"] == 1.0 and math.isnan(b.reward_components["format"])
        assert b.advantages == a.advantages
    meta = read_metadata(tmp_path)
    assert meta["schema_version"] == "4" and meta["gamma"] == "1.0" and meta["lam"] == "0.95"
    # Record batches of batch_rows, the remainder flushed at close.
    assert [b.num_rows for b in iter_batches(tmp_path)] == [4, 4, 2]


def test_generate_archives_leave_learner_columns_null(tmp_path):
    with ArchiveWriter(tmp_path, {}, COMPONENTS) as w:
        w.write(make_records(3, learner=False))
    table = read_table(tmp_path)
    for column in ("ref_logprobs", "values", "kl", "kl_coef", "token_rewards", "advantages", "returns"):
        assert table[column].null_count == 3


def test_files_roll_and_a_new_writer_never_reopens_old_files(tmp_path):
    with ArchiveWriter(tmp_path, {}, COMPONENTS, batch_rows=4, rows_per_file=8) as w:
        w.write(make_records(20))
    assert [p.name for p in archive_files(tmp_path)] == ["part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    before = (tmp_path / "part-00000.arrow").read_bytes()
    with ArchiveWriter(tmp_path, {}, COMPONENTS, batch_rows=4) as w:  # a resumed run
        w.write(make_records(4, iteration=1))
    assert (tmp_path / "part-00000.arrow").read_bytes() == before
    assert archive_files(tmp_path)[-1].name == "part-00003.arrow"
    assert read_table(tmp_path).num_rows == 24


def test_a_file_cut_mid_batch_reads_up_to_its_last_complete_batch(tmp_path):
    with ArchiveWriter(tmp_path, {}, COMPONENTS, batch_rows=5) as w:
        w.write(make_records(15))
    path = archive_files(tmp_path)[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # the crash: the last batch is incomplete, no end marker
    with pytest.warns(ArchiveCutWarning, match="cut mid-batch"):
        rows = sum(b.num_rows for b in iter_batches(tmp_path))
    assert rows == 10


def test_writer_errors_surface_to_the_producer(tmp_path):
    w = ArchiveWriter(tmp_path, {}, COMPONENTS)
    bad = make_records(1)
    bad[0].response_ids = ["not an int"]
    w.write(bad)
    with pytest.raises(RuntimeError, match="archive writer"):
        w.flush()


def test_other_readers_load_the_files(tmp_path):
    with ArchiveWriter(tmp_path, {}, COMPONENTS) as w:
        w.write(make_records(6))
    path = str(archive_files(tmp_path)[0])
    with pa.OSFile(path) as f:
        assert pa.ipc.open_stream(f).read_all().num_rows == 6
    polars = pytest.importorskip("polars")
    frame = polars.read_ipc_stream(path)
    assert frame.height == 6 and frame["response_ids"][0].to_list() == [10]


def test_datasets_loads_every_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    with ArchiveWriter(tmp_path, {}, COMPONENTS, rows_per_file=4) as w:
        w.write(make_records(6))
    ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in archive_files(tmp_path)])
    assert len(ds) == 6 and set(ds.column_names) == set(ARCHIVE_SCHEMA.names)
    row = ds[0]
    assert row["response_ids"] == [10] and row["kl"] == [0.25] and row["kl_coef"] == pytest.approx(0.05)
    assert row["reward_components"]["arithmetic"] == 1.0 and math.isnan(row["reward_components"]["format"])
    assert ds.to_pandas()["reward"].sum() == 6.0


def test_duckdb_queries_the_files(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    with ArchiveWriter(tmp_path, {}, COMPONENTS, rows_per_file=5) as w:
        w.write(make_records(8, iteration=0))
        w.write(make_records(4, iteration=1))
    # The recipe in docs/archive.md: every file's stream as one Arrow reader, which DuckDB scans.
    rollouts = pa.RecordBatchReader.from_batches(read_schema(tmp_path), iter_batches(tmp_path))  # noqa: F841 (scanned by name)
    rows = duckdb.sql(
        "SELECT iteration, avg(reward) AS reward, count(*) AS n, "
        "avg(reward_components.arithmetic) AS arithmetic, sum(len(response_ids)) AS tokens "
        "FROM rollouts GROUP BY iteration ORDER BY iteration"
    ).fetchall()
    assert rows == [(0, 1.0, 8, 1.0, 1 + 2 + 3 + 4 + 5 + 1 + 2 + 3), (1, 1.0, 4, 1.0, 1 + 2 + 3 + 4)]


def test_to_record_batch_matches_schema():
    batch = to_record_batch(make_records(2), COMPONENTS)
    assert batch.schema.equals(ARCHIVE_SCHEMA)


def test_ready_batches_are_written_in_order_with_records(tmp_path):
    records = make_records(10)
    with ArchiveWriter(tmp_path, {}, COMPONENTS, batch_rows=4, rows_per_file=6) as w:
        w.write(records[:3])
        w.write_batch(to_record_batch(records[3:9], COMPONENTS))
        w.write(records[9:])
    back = [r.response for b in iter_batches(tmp_path) for r in from_record_batch(b)]
    assert back == [r.response for r in records]
    with pytest.raises(ValueError, match="schema"):
        ArchiveWriter(tmp_path / "x", {}, COMPONENTS).write_batch(pa.record_batch({"a": [1]}))


def test_files_of_other_reward_components_read_as_their_union(tmp_path):
    """A run resumed with another reward config: its new files have other components."""
    with ArchiveWriter(tmp_path, {}, COMPONENTS) as w:
        w.write(make_records(2))
    later = make_records(2, iteration=1)
    for r in later:
        r.reward_components = {"arithmetic": 0.5, "length": -1.0}
    with ArchiveWriter(tmp_path, {}, ("arithmetic", "length")) as w:
        w.write(later)
    assert read_schema(tmp_path).equals(archive_schema(("arithmetic", "format", "length")))
    components = read_table(tmp_path)["reward_components"].to_pylist()
    assert components[0]["length"] is None and math.isnan(components[0]["format"])
    assert components[3] == {"arithmetic": 0.5, "format": None, "length": -1.0}


def test_a_v3_file_reads_as_v4_with_one_version_throughout(tmp_path):
    """A v3 file has no version or segment columns: each row was generated whole by its policy_version."""
    from contracts.schema import V4_FIELDS

    records = make_records(4)
    batch = to_record_batch(records, COMPONENTS)
    v4 = {f.name for f in V4_FIELDS}
    v3_schema = pa.schema([f for f in batch.schema if f.name not in v4]).with_metadata({"schema_version": "3"})
    v3_batch = pa.RecordBatch.from_arrays([batch.column(f.name) for f in v3_schema], schema=v3_schema)
    (tmp_path / "rollouts").mkdir()
    with pa.OSFile(str(tmp_path / "rollouts" / "part-00000.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, v3_schema) as writer:
            writer.write_batch(v3_batch)
    table = read_table(tmp_path)
    assert table.schema.equals(archive_schema(COMPONENTS))
    assert table["policy_version_last"].to_pylist() == [r.policy_version for r in records]
    assert table["resumed_at"].to_pylist() == [[]] * 4 and table["resumed_versions"].to_pylist() == [[]] * 4
    assert table["episode_id"].to_pylist() == [None] * 4 and table["segment"].to_pylist() == [0] * 4
