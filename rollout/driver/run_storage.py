"""A run directory at a URI (`--out s3://bucket/run`): a local staging copy the job writes, mirrored
to the bucket as whole objects.

The job reads and writes a local directory as it always does (`ROLLOUT_CACHE/runs/<hash of the URI>`);
this module moves files between it and the URI through pyarrow's filesystems (s3://, gs://, file://,
with credentials and endpoint from the standard variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL). Object stores have no rename, so what a reader trusts is ordered by
upload: a checkpoint's files before `checkpoints/latest` names it, the archive's rows before the
checkpoint that says they were trained.

    pull        at start: every object the staging copy lacks (or holds at another size) comes down,
                so a fresh driver on any machine resumes from the bucket's newest checkpoint
    push        after each iteration (metrics, manifest), at each checkpoint (archive, checkpoint,
                `latest`, pruned ones removed) and at the end (everything, logs included)
    lease       `lease.json` in the bucket: one driver per run (an owner and an expiry, renewed by a
                thread while the driver lives; object stores have no flock)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

from contracts.builtin_model import cache_dir
from contracts.errors import UserError, first_line
from contracts.storage import configure_driver, is_uri, list_tree, open_uri, put_file, sync_down
from rollout.driver.run_lock import LOCK

__all__ = ["RunStorage", "RunStorageError", "is_uri", "staging_dir"]

LEASE = "lease.json"
LEASE_S = 120.0  # a driver that stops renewing (killed, its machine lost) frees the run after this
RENEW_S = 30.0
SMALL = ("run_id", "config.yaml", "manifest.json", "metrics.jsonl")  # rewritten whole; pushed when changed


class RunStorageError(UserError):
    """The run's URI cannot be read or written, or another driver holds it; the message says which."""


def staging_dir(uri: str) -> Path:
    """This machine's working copy of the run at `uri`, kept between starts (a resume here pulls only
    what changed)."""
    cache = cache_dir()
    name = re.sub(r"[^A-Za-z0-9]+", "-", uri.split("://", 1)[1]).strip("-")[-48:]
    return cache / "runs" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


class RunStorage:
    def __init__(self, uri: str, staging: Path | None = None):
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        self.staging = staging or staging_dir(self.uri)
        try:
            self.fs, self.root = open_uri(self.uri)
            if self.fs.type_name in ("s3", "gcs"):
                bucket = self.root.split("/", 1)[0]  # credentials, endpoint and bucket are tried once, here
                found = self._info(bucket).type == pafs.FileType.Directory
            else:
                bucket, found = self.root, True
                self.fs.create_dir(self.root, recursive=True)
        except (OSError, ValueError) as e:
            raise RunStorageError(f"--out {self.uri}: cannot open the run storage ({first_line(e)})") from None
        if not found:
            raise RunStorageError(
                f"--out {self.uri}: {bucket} does not exist or cannot be listed with these credentials "
                "(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...): create it, or pass another --out"
            )
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) last pushed or pulled
        self._owner = {"host": platform.node(), "pid": os.getpid(), "command": " ".join(sys.argv)}
        self._released = threading.Event()

    # -- start -----------------------------------------------------------------------------------

    def pull(self, log) -> None:
        """Bring the staging copy up to the bucket's: a resume anywhere starts from what the bucket holds."""
        self.staging.mkdir(parents=True, exist_ok=True)
        fetched, remote = sync_down(
            self.fs, self.root, self.staging, skip=lambda relative: relative == LEASE or relative.startswith("logs/")
        )
        for relative in remote:
            if (self.staging / relative).is_file():
                self._pushed[relative] = _stamp(self.staging / relative)
        # A staging copy may hold what the bucket lost or never got (a crash before a push, an earlier
        # run at the same URI): the bucket wins. The lock is this machine's; logs are only ever added to.
        for path in sorted(self.staging.rglob("*"), reverse=True):
            relative = path.relative_to(self.staging).as_posix()
            if relative == LOCK or relative.split("/", 1)[0] == "logs" or relative.startswith(".driver-"):
                continue
            if path.is_file() and relative not in remote:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if remote:
            print(f"run storage: {self.uri} pulled into {self.staging} ({fetched / 1e6:.1f} MB fetched)", file=log)
        configure_driver(self.uri, self.staging)  # actors on nodes that cannot see this disk fetch from the URI

    def stage_model(self, path: str) -> str:
        """A model directory on this disk, copied into the staging copy (`models/NAME`) and pushed, so
        that actors on any node can fetch it; a hub id (not a directory) is left to the hub."""
        source = Path(path)
        if not source.is_dir():
            return path
        staged = self.staging / "models" / source.name
        if not staged.is_dir():
            temporary = staged.with_name(f".{source.name}.copying")
            shutil.rmtree(temporary, ignore_errors=True)
            shutil.copytree(source, temporary)
            temporary.rename(staged)
        self.push_tree(f"models/{source.name}")
        return str(staged)

    def pull_tree(self, relative: str) -> None:
        """What actors on other nodes published under `relative` (a checkpoint's shards), to the staging copy."""
        sync_down(self.fs, f"{self.root}/{relative}", self.staging / relative)

    def take_lease(self) -> None:
        """Refuse a run another live driver holds; hold it ourselves until `release`, renewed every RENEW_S
        (a driver that dies frees it LEASE_S after its last renewal)."""
        held = self._read_json(LEASE)
        if held and held.get("expires", 0) > time.time() and not _ours_or_ended(held.get("owner", {})):
            raise RunStorageError(
                f"--out {self.uri} is in use by {held['owner']['command']!r} (pid {held['owner']['pid']} on "
                f"{held['owner']['host']}, lease until {_utc(held['expires'])}); wait for that run to end, "
                f"stop it, or pass another --out"
            )
        self._renew()
        threading.Thread(target=self._keep_lease, name="run-storage-lease", daemon=True).start()

    def _keep_lease(self) -> None:
        while not self._released.wait(RENEW_S):
            try:
                self._renew()
            except OSError as e:  # the next push says it loudly if the storage is gone
                print(f"run storage: renewing the lease on {self.uri} failed ({first_line(e)})", file=sys.stderr)

    # -- during the run --------------------------------------------------------------------------

    def push_small(self) -> None:
        """The files rewritten whole every iteration (metrics, manifest, config, run id)."""
        for name in SMALL:
            self._put(name)

    def push_checkpoint(self, directory: Path) -> None:
        """A committed checkpoint, in the order a reader trusts: the archive it covers, its files,
        the manifest, `latest`; then the checkpoints the staging copy pruned go from the bucket too."""
        self.push_tree("rollouts")
        self.push_tree(f"checkpoints/{directory.name}")
        self.push_small()
        self._put("checkpoints/latest")
        self._remove(f"checkpoints/{directory.name}.partial")  # what ranks on other nodes published
        kept = {p.name for p in (self.staging / "checkpoints").glob("iter-*")}
        for relative in list(list_tree(self.fs, f"{self.root}/checkpoints")):
            name = relative.split("/", 1)[0]
            if name.startswith("iter-") and not name.endswith(".partial") and name not in kept:
                self._remove(f"checkpoints/{name}")

    def _remove(self, relative: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(f"{self.root}/{relative}").type == pafs.FileType.NotFound:
            return
        self.fs.delete_dir_contents(f"{self.root}/{relative}", missing_dir_ok=True)
        self.fs.delete_dir(f"{self.root}/{relative}")
        self._pushed = {r: s for r, s in self._pushed.items() if not r.startswith(f"{relative}/")}

    def push_all(self) -> None:
        """Everything the staging copy holds that the bucket lacks (at the end of a run, failed or not)."""
        for top in ("rollouts", "logs", "tensorboard"):
            self.push_tree(top)
        self.push_small()

    def release(self) -> None:
        self._released.set()
        held = self._read_json(LEASE)
        if held and held.get("owner") == self._owner:
            self.fs.delete_file(f"{self.root}/{LEASE}")

    def push_tree(self, relative: str) -> None:
        local = self.staging / relative
        if not local.exists():
            return
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self._put(path.relative_to(self.staging).as_posix())

    # -- helpers ---------------------------------------------------------------------------------

    def _put(self, relative: str) -> None:
        """One object, written whole (S3 shows a put only once it completed); skipped while the file is
        as it was when last pushed or pulled."""
        local = self.staging / relative
        if not local.is_file():
            return
        stamp = _stamp(local)
        if self._pushed.get(relative) == stamp:
            return
        put_file(self.fs, local, f"{self.root}/{relative}")
        self._pushed[relative] = stamp

    def _renew(self) -> None:
        lease = {"owner": self._owner, "expires": time.time() + LEASE_S}
        with self.fs.open_output_stream(f"{self.root}/{LEASE}") as sink:
            sink.write(json.dumps(lease).encode())

    def _read_json(self, relative: str) -> dict | None:
        import pyarrow.fs as pafs

        path = f"{self.root}/{relative}"
        if self._info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as source:
            return json.loads(source.read() or b"null")

    def _info(self, path: str):
        return self.fs.get_file_info(path)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _ours_or_ended(owner: dict) -> bool:
    """Our own lease, or one whose holder on this machine has ended (a crash, SIGKILL): free to take."""
    if owner.get("host") != platform.node():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return owner["pid"] == os.getpid()


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
