"""Checkpoints made whole by a manifest; a resume that finds the newest broken falls back to the one before."""

import io

import pytest

from contracts.config.load import load_config
from learner.checkpoint import MANIFEST_FILE, problem
from learner.learner import Learner
from rollout.driver.checkpoints import AUTO, NEVER, Checkpoints, ResumeError


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_path, tmp_path_factory):
    """A run directory with the checkpoints of iterations 4 and 9, written by a real learner."""
    run_dir = tmp_path_factory.mktemp("run")
    learner = Learner(load_config(None, ["learner.device=cpu"]).learner, tiny_model_path)
    checkpoints = Checkpoints(run_dir, keep_last=3)
    for iteration in (4, 9):
        partial = checkpoints.partial(iteration)
        learner.save(partial, {"iteration": iteration})
        checkpoints.commit(partial)
    return run_dir


def copy_of(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", Checkpoints(tmp_path / "run", keep_last=3)


def test_a_committed_checkpoint_lists_every_file_and_verifies(two_checkpoints):
    newest = two_checkpoints / "checkpoints" / "iter-000009"
    assert (two_checkpoints / "checkpoints" / "latest").read_text() == "iter-000009"
    manifest = (newest / MANIFEST_FILE).read_text()
    for name in ("learner.pt", "policy/model.safetensors", "policy/config.json", "learner/.metadata"):
        assert f'"{name}"' in manifest
    assert problem(newest) is None
    log = io.StringIO()
    assert Checkpoints(two_checkpoints, 3).resume_point(AUTO, log) == newest and log.getvalue() == ""


def test_a_truncated_shard_in_the_newest_falls_back_to_the_previous_in_one_line(two_checkpoints, tmp_path):
    run_dir, checkpoints = copy_of(two_checkpoints, tmp_path)
    shard = next((run_dir / "checkpoints" / "iter-000009" / "learner").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    log = io.StringIO()
    assert checkpoints.resume_point(AUTO, log) == run_dir / "checkpoints" / "iter-000004"
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"checkpoint iter-000009 is broken (learner/{shard.name} has 100 bytes, its manifest says"
    )
    assert lines[0].endswith("resuming from iter-000004")


def test_a_latest_naming_a_missing_directory_falls_back_to_the_newest_whole_one(two_checkpoints, tmp_path):
    run_dir, checkpoints = copy_of(two_checkpoints, tmp_path)
    (run_dir / "checkpoints" / "latest").write_text("iter-000014")
    log = io.StringIO()
    assert checkpoints.resume_point(AUTO, log) == run_dir / "checkpoints" / "iter-000009"
    assert log.getvalue() == "checkpoint iter-000014 is broken (its directory is missing): resuming from iter-000009\n"


def test_a_changed_byte_is_found_by_its_hash(two_checkpoints, tmp_path):
    run_dir, _ = copy_of(two_checkpoints, tmp_path)
    weights = run_dir / "checkpoints" / "iter-000009" / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert problem(weights.parents[1]) == f"policy/model.safetensors does not match its sha256 in {MANIFEST_FILE}"


def test_the_operator_chooses_with_resume_from_and_no_resume(two_checkpoints, tmp_path):
    run_dir, checkpoints = copy_of(two_checkpoints, tmp_path)
    older = run_dir / "checkpoints" / "iter-000004"
    assert checkpoints.resume_point(older, io.StringIO()) == older
    assert checkpoints.resume_point(NEVER, io.StringIO()) is None
    (older / "learner.pt").unlink()
    with pytest.raises(
        ResumeError, match=r"--resume-from .*iter-000004: not a whole checkpoint \(learner.pt is missing\)"
    ):
        checkpoints.resume_point(older, io.StringIO())


def test_nothing_whole_left_starts_from_the_model_and_says_why(two_checkpoints, tmp_path):
    run_dir, checkpoints = copy_of(two_checkpoints, tmp_path)
    for name in ("iter-000004", "iter-000009"):
        (run_dir / "checkpoints" / name / "policy" / "model.safetensors").unlink()
    log = io.StringIO()
    assert checkpoints.resume_point(AUTO, log) is None
    assert log.getvalue().count("no whole one is left: starting from the start model") == 2


def test_pruning_keeps_the_newest(tiny_model_path, tmp_path):
    learner = Learner(load_config(None, ["learner.device=cpu"]).learner, tiny_model_path)
    checkpoints = Checkpoints(tmp_path, keep_last=2)
    for iteration in range(3):
        partial = checkpoints.partial(iteration)
        learner.save(partial, {"iteration": iteration})
        checkpoints.commit(partial)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-000001", "iter-000002", "latest"]


class SavingLearner:
    """Stands in for the learner's ranks: `save` writes `learner.pt` once `finished`; `written` says when."""

    def __init__(self):
        self.finished = False

    def save(self, directory, extra):
        directory.mkdir(parents=True)
        (directory / "shard").write_text(str(extra))
        if self.finished:
            (directory / "learner.pt").write_text("state")

    def written(self, wait):
        return 2.5 if self.finished or wait else None


class Tokenizer:
    def save_pretrained(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text("{}")


def lifecycle(tmp_path):
    from rollout.archive.manifest import RunManifest

    manifest = RunManifest(tmp_path, "r")
    manifest.data["iterations"] = [{"iteration": i, "checkpoint": None} for i in range(3)]
    checkpoints = Checkpoints(tmp_path, keep_last=None, manifest=manifest, tokenizer=Tokenizer())
    assert checkpoints.resume_point(AUTO, io.StringIO()) is None
    return checkpoints, manifest


def test_a_write_is_committed_once_the_learner_says_it_is_done_and_becomes_the_restart_point(tmp_path):
    checkpoints, manifest = lifecycle(tmp_path)
    learner = SavingLearner()
    learner.finished = True
    checkpoints.save(1, {"sampler": {}}, learner)
    assert (tmp_path / "checkpoints" / "iter-000001.partial" / "learner.pt").is_file()
    checkpoints.commit_written(learner, wait=False)
    whole = tmp_path / "checkpoints" / "iter-000001"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter-000001"
    assert (whole / "policy" / "tokenizer.json").is_file() and problem(whole) is None
    assert [it["checkpoint"] for it in manifest.data["iterations"]] == [None, "iter-000001", None]
    assert checkpoints.write_seconds() == 2.5 and checkpoints.write_seconds() is None  # said once
    assert checkpoints.restart_point() == whole


def test_a_rank_lost_mid_write_removes_the_partial_and_one_lost_after_it_commits_it(tmp_path):
    checkpoints, manifest = lifecycle(tmp_path)
    learner = SavingLearner()
    checkpoints.save(0, {}, learner)
    checkpoints.commit_written(learner, wait=False)  # still writing
    assert not (tmp_path / "checkpoints" / "iter-000000").exists()
    assert checkpoints.restart_point() is None  # the rank was lost before rank 0 wrote learner.pt
    assert not (tmp_path / "checkpoints" / "iter-000000.partial").exists()
    learner.finished = True
    checkpoints.save(2, {}, learner)
    assert checkpoints.restart_point() == tmp_path / "checkpoints" / "iter-000002"  # whole: the new ranks load it
    assert manifest.data["iterations"][2]["checkpoint"] == "iter-000002" and checkpoints.write_seconds() is None
    checkpoints.commit_written(learner, wait=True)  # nothing left in flight
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-000002", "latest"]
