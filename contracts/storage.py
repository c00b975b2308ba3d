"""Run storage at a URI, seen from any process of the job: the driver, a learner rank, an engine.

With `--out s3://bucket/run` the driver keeps a staging copy of the run on its disk and mirrors it to
the URI (`rollout.driver.run_storage`). A path under that staging copy (the start model, a checkpoint)
means the same relative object under the URI, so an actor on a node that cannot see the driver's
disk `fetch`es it into the same path on its own disk, and `publish`es what it writes there (a
checkpoint's shards) for the driver to pull. An actor that does see the driver's disk (the same
node, or a disk both mount) does neither: it finds the driver's mark in the staging copy.

Credentials and endpoint: the standard AWS_* variables, as pyarrow reads them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import threading
import time
import uuid
from pathlib import Path

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STORAGE_ENV = "ROLLOUT_RUN_STORAGE"  # the run's URI
STAGING_ENV = "ROLLOUT_RUN_STAGING"  # the driver's staging copy of it
MARK_ENV = "ROLLOUT_RUN_MARK"  # a file the driver leaves in the staging copy: whoever sees it sees the driver's disk
PASSED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)
_driver_env: dict[str, str] = {}


def is_uri(location: str) -> bool:
    return bool(URI.match(location))


def open_uri(uri: str):
    """(pyarrow filesystem, root path inside it) of a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri.rstrip("/"))


def list_tree(fs, base: str) -> dict[str, int]:
    """Every object under `base`, by path relative to it, with its size; {} when there is none."""
    import pyarrow.fs as pafs

    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return {}
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return {
        info.path[len(base) + 1 :]: info.size for info in fs.get_file_info(selector) if info.type == pafs.FileType.File
    }


def put_file(fs, local: Path, remote: str) -> None:
    """One object, written whole (an object store shows a put only once it completed)."""
    with open(local, "rb") as source, fs.open_output_stream(remote) as sink:
        while chunk := source.read(16 << 20):
            sink.write(chunk)


def get_file(fs, remote: str, local: Path) -> None:
    """One object to a local file, under a temporary name until it is whole."""
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    with fs.open_input_stream(remote) as source, open(partial, "wb") as sink:
        while chunk := source.read(16 << 20):
            sink.write(chunk)
    os.replace(partial, local)


def sync_down(fs, base: str, local: Path, skip=lambda relative: False) -> tuple[int, dict[str, int]]:
    """Every object under `base` (but those `skip` names) that `local` lacks or holds at another size;
    (the bytes fetched, every object under `base` with its size)."""
    fetched = 0
    remote = list_tree(fs, base)
    for relative, size in remote.items():
        path = local / relative
        if skip(relative):
            continue
        if not (path.is_file() and path.stat().st_size == size):
            get_file(fs, f"{base}/{relative}", path)
            fetched += size
    return fetched, remote


# -- the driver's side ---------------------------------------------------------------------------


def configure_driver(uri: str, staging: Path) -> None:
    """Leave the mark in the staging copy and remember what every actor is told (`actor_env`)."""
    mark = f".driver-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True, exist_ok=True)
    for old in staging.glob(".driver-*"):
        old.unlink(missing_ok=True)
    (staging / mark).write_text("")
    _driver_env.clear()
    _driver_env.update({STORAGE_ENV: uri, STAGING_ENV: str(staging.resolve()), MARK_ENV: mark})
    _driver_env.update({name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)})


def actor_env() -> dict[str, str]:
    """Environment variables for an actor's runtime env: the run storage and its credentials."""
    return dict(_driver_env)


# -- an actor's side -----------------------------------------------------------------------------


def fetch(path: str | Path) -> str:
    """`path`, made present on this node: a tree under the run's staging copy comes down from the
    run's URI where this node cannot see the driver's disk. Any other path is left as it is."""
    remote = _remote(path)
    if remote is not None:
        fs, base = remote
        fetched, _ = sync_down(fs, base, Path(path))
        if fetched:
            print(
                f"{path}: fetched {fetched / 1e6:.1f} MB from the run storage (this node cannot see the driver's disk)"
            )
    return str(path)


def publish(path: str | Path) -> None:
    """Upload a tree this process wrote under the run's staging copy, where the driver cannot see it."""
    remote = _remote(path)
    if remote is None:
        return
    fs, base = remote
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        put_file(fs, file, f"{base}/{file.relative_to(root).as_posix()}")


SHIP_S = 10.0  # how often a log written where the driver cannot see it is uploaded, while it grows


def ship_log(path: str | Path) -> None:
    """Upload this process's log file to the run storage now, every SHIP_S while it grows and at exit,
    when the driver cannot see this node's disk (the log would be lost with the node; a killed actor
    loses the last SHIP_S of it)."""
    remote = _remote(path)
    if remote is None:
        return
    fs, target = remote
    local = Path(path)
    shipped = [-1]

    def ship() -> None:
        size = local.stat().st_size if local.exists() else -1
        if size != shipped[0]:
            put_file(fs, local, target)
            shipped[0] = size

    def keep_shipping() -> None:
        while True:
            with contextlib.suppress(OSError):  # the storage is unreachable for now: the next round tries again
                ship()
            time.sleep(SHIP_S)

    threading.Thread(target=keep_shipping, name="log-shipper", daemon=True).start()
    atexit.register(_quietly, ship)


def _quietly(step) -> None:
    with contextlib.suppress(OSError):
        step()


def _remote(path: str | Path):
    """(filesystem, object path) standing for `path`, when it is the run's and this node cannot see it."""
    uri, staging, mark = (os.environ.get(name) for name in (STORAGE_ENV, STAGING_ENV, MARK_ENV))
    if not (uri and staging and mark) or (Path(staging) / mark).exists():
        return None
    try:
        relative = Path(path).resolve().relative_to(staging)
    except ValueError:
        return None
    fs, root = open_uri(uri)
    return fs, f"{root}/{relative.as_posix()}"
