"""Environments in processes of their own (`env.num_processes`), for steps that compute in Python.

On the rollout worker's threads, an environment's Python work holds the interpreter lock that the engine's
loop needs between its kernels (`benchmarks/multiturn.py --busy`). Here each of N host processes keeps the
environments of the episodes given to it, made and stepped there on threads of its own (`env.num_threads`
shared out between the hosts); the worker's threads only wait on them.

A host is `python -m rollout.generation.env_processes`, spoken to over its stdin and a copy of its stdout
(the environment's own prints go to stderr): length-prefixed pickles, (call id, operation, episode key,
argument) in, (call id, ok, value or (exception class, text)) out. A step past `env.step_timeout_s` kills its host
(nothing else stops a stuck step), and the host starts again on the next call; the episodes whose
environments it held end with `env_error`, as do those of a host that died. A host whose worker dies
reads the end of its stdin and exits.
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from contracts.environment import StepResult
from contracts.errors import JobFailure, UserError

_HEADER = struct.Struct("<I")
# A host answers this call id once it has imported the environment's class; its start is not a step's time.
READY = -1
START_TIMEOUT_S = 120.0
# A stuck step is the runner's to report first (`env.step_timeout_s`, polled on its loop); its host is stopped
# this much later.
KILL_GRACE_S = 1.0


class EnvironmentLost(JobFailure):
    """The host process holding an episode's environment exited (or was stopped) before answering."""


class EnvironmentRaised(UserError):
    """An environment's exception in its host, by its class name and text (any exception pickles this way):
    the environment's code is the user's."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    """The next message, or EOFError at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    return pickle.loads(stream.read(_HEADER.unpack(header)[0]))


def class_address(cls: type) -> tuple[str, str, list[str]]:
    """(module, qualified name, sys.path) by which a host imports `cls`; a class of a script run as a file
    (module `__main__`, as the benchmarks are) is imported as the script's own module."""
    module = cls.__module__
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        module = spec.name if spec is not None else os.path.splitext(os.path.basename(main.__file__))[0]
    return module, cls.__qualname__, list(sys.path)


class EnvironmentHost:
    """One host process and the calls in flight to it, from any number of threads."""

    def __init__(self, index: int, address: tuple[str, str, list[str]], params: dict[str, Any], threads: int):
        self.index, self.address, self.params, self.threads = index, address, params, threads
        self.generation = 0  # starts of the process: an episode made in an earlier one has lost its environment
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._process: subprocess.Popen | None = None

    def call(self, operation: str, key: int, argument: Any, generation: int | None, timeout_s: float | None):
        """`operation` on episode `key`'s environment, in the host; its value, or the environment's exception
        raised here. `generation`: the host's generation the environment was made in (None: a new one)."""
        future: Future = Future()
        with self._lock:
            if self._process is None:
                self._start()
            if generation is not None and generation != self.generation:
                raise EnvironmentLost(f"its environment was in environment process {self.index}, which exited")
            started = self.generation
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                _send(self._process.stdin, (call_id, operation, key, argument))
            except (BrokenPipeError, OSError):
                self._pending.pop(call_id, None)
                why = self._exited(self._process)
                self._stop(why)
                raise EnvironmentLost(why) from None
        try:
            return future.result(timeout=timeout_s), started
        except TimeoutError:
            with self._lock:
                if self.generation == started:  # a stuck step stops only with its process
                    self._stop(f"environment process {self.index} was stopped: a step ran past env.step_timeout_s")
            raise

    def start(self) -> None:
        with self._lock:
            if self._process is None:
                self._start()

    def send(self, operation: str, key: int) -> None:
        """`operation` without waiting for its answer (an episode's environment let go)."""
        with self._lock:
            if self._process is not None:
                try:
                    _send(self._process.stdin, (next(self._ids), operation, key, None))
                except (BrokenPipeError, OSError):
                    self._stop(self._exited(self._process))

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._stop("the environments were let go")

    def _start(self) -> None:
        module, qualname, path = self.address
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.generation += 1
        ready: Future = Future()
        self._pending: dict[int, Future] = {READY: ready}
        reader = threading.Thread(
            target=self._read, args=(self._process, self._pending), name=f"env-host-{self.index}", daemon=True
        )
        reader.start()
        try:
            _send(self._process.stdin, (module, qualname, self.params, self.threads))
            ready.result(timeout=START_TIMEOUT_S)
        except (OSError, EnvironmentLost, TimeoutError) as e:
            self._stop(str(e))
            raise EnvironmentLost(
                f"environment process {self.index} did not start ({e or 'no answer'}; its own error, if any, is in "
                f"the rollout worker's log): {module}.{qualname} must be importable in a new Python process"
            ) from None

    def _read(self, process: subprocess.Popen, pending: dict[int, Future]) -> None:
        """The answers, each to its call, until the process ends; then every call still waiting fails."""
        try:
            while True:
                call_id, ok, value = _receive(process.stdout)
                future = pending.pop(call_id, None)
                if future is not None:
                    future.set_result(value) if ok else future.set_exception(EnvironmentRaised(*value))
        except (EOFError, OSError):
            pass  # the host exited
        except Exception:  # noqa: BLE001 - an answer that did not unpickle: the host is done
            process.kill()
        why = self._exited(process)
        for future in list(pending.values()):  # before the lock: a start that holds it may wait on one of them
            if not future.done():
                future.set_exception(EnvironmentLost(why))
        pending.clear()
        with self._lock:
            if self._process is process:
                self._process = None

    def _exited(self, process: subprocess.Popen) -> str:
        try:
            return f"environment process {self.index} exited with code {process.wait(timeout=5)}"
        except subprocess.TimeoutExpired:
            return f"environment process {self.index} stopped answering"

    def _stop(self, why: str) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_exception(EnvironmentLost(why))


class HostedEnvironment:
    """An episode's environment in a host process, with the `Environment` calls the runner makes."""

    def __init__(self, host: EnvironmentHost, key: int, timeout_s: float):
        self.host, self.key, self.timeout_s = host, key, timeout_s
        self.generation: int | None = None

    def reset(self, record: Any) -> str | None:
        extra, self.generation = self.host.call("reset", self.key, record, None, self.timeout_s)
        return extra

    def step(self, text: str) -> StepResult:
        return self.host.call("step", self.key, text, self.generation, self.timeout_s)[0]

    def close(self) -> None:
        self.host.send("close", self.key)


class EnvironmentHosts:
    """`env.num_processes` host processes, each episode's environment in one of them (in turn), each started
    on first use."""

    def __init__(self, env_class: type, cfg):
        """Starts the hosts, and waits for them: a class they cannot import fails here, before any episode."""
        address = class_address(env_class)
        threads = max(1, cfg.num_threads // cfg.num_processes)
        self.hosts = [EnvironmentHost(i, address, dict(cfg.params), threads) for i in range(cfg.num_processes)]
        self.timeout_s = cfg.step_timeout_s + KILL_GRACE_S
        self._keys = itertools.count()
        for host in self.hosts:
            host.start()

    def make(self) -> HostedEnvironment:
        key = next(self._keys)
        return HostedEnvironment(self.hosts[key % len(self.hosts)], key, self.timeout_s)

    def close(self) -> None:
        for host in self.hosts:
            host.close()


def _serve() -> None:
    """A host's loop: the class to make, then calls, each on a thread of the host's (an environment that
    waits overlaps with the others, as on the worker's threads), until the worker closes stdin."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the environment's prints go to stderr, not into the answers
    requests = sys.stdin.buffer
    module, qualname, params, threads = _receive(requests)
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    environments: dict[int, Any] = {}
    sending = threading.Lock()
    _send(answers, (READY, True, None))

    def run(call_id: int, operation: str, key: int, argument: Any) -> None:
        try:
            if operation == "reset":
                environments[key] = cls(**params)
                answer = (call_id, True, environments[key].reset(argument))
            else:
                answer = (call_id, True, environments[key].step(argument))
        except Exception as e:  # noqa: BLE001 - an environment's error is its episode's, sent back to it
            answer = (call_id, False, (type(e).__name__, str(e)))
        with sending:
            try:
                _send(answers, answer)
            except Exception as e:  # noqa: BLE001 - a value that does not pickle
                _send(answers, (call_id, False, (type(e).__name__, f"its answer could not be sent back: {e}")))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env-step") as pool:
        while True:
            try:
                call_id, operation, key, argument = _receive(requests)
            except EOFError:
                os._exit(0)  # steps still running are the worker's no more
            if operation == "close":
                environments.pop(key, None)
            else:
                pool.submit(run, call_id, operation, key, argument)


if __name__ == "__main__":
    _serve()
