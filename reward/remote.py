"""Scores from a reward server of your own (`reward.remote`): samples POSTed to it as JSON batches,
with the standard library only (urllib and a thread pool).

The wire format, one POST of `Content-Type: application/json` per batch of up to `batch_size`
samples (docs/rewards.md, "A reward server of your own", shows it too):

    request   {"samples": [{"prompt": str, "response": str, "reference": str | null, "metadata": {...}}]}
    answer    HTTP 200, {"scores": [number | null, ...]}   one per sample, in the same order

`prompt` is the final user turn (what the rules read), `reference` the data record's reference
answer and `metadata` its metadata. A null (or a non-finite number) is a sample the server could
not score: its `remote` component is NaN and counted failed, like a rule that raised.

A request that fails (no connection, HTTP 5xx or 429, a time-out, an answer that is not that JSON
or holds the wrong number of scores) is sent again after `backoff_s`, doubling, up to
`max_retries` times; another HTTP status is the request's fault and is not retried. A batch that
still fails fails the job with `RemoteRewardError`: no score is made up for a server that is down.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from contracts.config import RemoteRewardConfig
from contracts.errors import JobFailure

log = logging.getLogger(__name__)

REMOTE_COMPONENT = "remote"


class RemoteRewardError(JobFailure):
    """The reward server stayed down after its retries, or refused a batch: a failure of the job
    (not of one sample), its message one line naming `reward.remote.url` and the last error."""


class _Retry(JobFailure):
    """One request failed in a way another try may mend; the message says how, in a few words."""


def check_url(url: str) -> str | None:
    """Why `url` cannot be the reward server's address, or None when it can."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as e:
        return f"{url!r} is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host, such as http://scorer.internal:8000/score"
    return None


class RemoteScorer:
    """Scores samples (the wire format's dicts) with the server at `cfg.url`: one request per
    `cfg.batch_size` samples, at most `cfg.max_in_flight` of them open at once."""

    def __init__(self, cfg: RemoteRewardConfig):
        problem = check_url(cfg.url)
        if problem:  # start-up checks it first; this is for callers that skip them (replay's re-scoring)
            raise ValueError(f"reward.remote.url: {problem}")
        self.cfg = cfg
        self._where = f"reward.remote.url {cfg.url}"
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_in_flight, thread_name_prefix="reward-remote")
        self._lock = threading.Lock()  # the counters below are bumped from the pool's threads
        self.requests = 0  # sent, answered or not: what a stall watch sees move
        self.retries = 0
        self.failures = 0  # samples the server answered null (or a non-finite number) for
        self.seconds = 0.0  # summed over requests, which overlap

    def submit(self, samples: Sequence[dict[str, Any]]) -> list[Future]:
        """Starts scoring `samples` and returns at once: one future per batch, for `gather`."""
        size = self.cfg.batch_size
        return [self._pool.submit(self._batch, list(samples[i : i + size])) for i in range(0, len(samples), size)]

    def gather(self, pending: list[Future]) -> list[float]:
        """The scores of `submit`'s batches, in sample order, NaN where the server could not score a
        sample. Raises RemoteRewardError when a batch failed for good, dropping those not yet sent."""
        deadline = time.monotonic() + self._longest_wait(len(pending))
        scores: list[float] = []
        try:
            for future in pending:
                try:
                    scores.extend(future.result(timeout=max(0.0, deadline - time.monotonic())))
                except FutureTimeout:
                    raise RemoteRewardError(
                        f"{self._where}: no whole answer within {self._longest_wait(len(pending)):.0f}s "
                        "(the server sends too slowly); check the server or raise reward.remote.timeout_s"
                    ) from None
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        return scores

    def score(self, samples: Sequence[dict[str, Any]]) -> list[float]:
        """`submit`, then `gather`."""
        return self.gather(self.submit(samples))

    def close(self) -> None:
        """Stop taking work; requests already open are not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _longest_wait(self, batches: int) -> float:
        # A backstop for `gather`: urllib bounds each socket wait by timeout_s and `_read` the body,
        # but a server dripping its headers a byte at a time would otherwise hold a batch forever.
        tries = self.cfg.max_retries + 1
        one_batch = tries * 3 * self.cfg.timeout_s + self.cfg.backoff_s * (2**self.cfg.max_retries - 1)
        return math.ceil(batches / self.cfg.max_in_flight) * one_batch + 1.0

    def _batch(self, samples: list[dict[str, Any]]) -> list[float]:
        """One batch's scores, retried with back-off; RemoteRewardError when every try failed."""
        body = json.dumps({"samples": samples}, default=str).encode()
        tries = self.cfg.max_retries + 1
        for attempt in range(tries):
            try:
                return self._post(body, len(samples))
            except _Retry as e:
                last = str(e)
            if attempt + 1 < tries:
                wait = self.cfg.backoff_s * 2**attempt
                with self._lock:
                    self.retries += 1
                    first = self.retries == 1
                # The first retry is worth a warning; a flapping server would flood the log with the rest.
                (log.warning if first else log.debug)("%s: %s; retrying in %.2gs", self._where, last, wait)
                time.sleep(wait)
        raise RemoteRewardError(
            f"{self._where}: no answer after {tries} tries (last: {last}); "
            "check the server or raise reward.remote.max_retries"
        )

    def _post(self, body: bytes, expected: int) -> list[float]:
        """One request's scores; _Retry when another try may mend it, RemoteRewardError when not."""
        request = urllib.request.Request(
            self.cfg.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as answer:
                raw = self._read(answer, started + self.cfg.timeout_s)
        except urllib.error.HTTPError as e:
            with e:  # it holds the connection open
                detail = e.read(200).decode("utf-8", "replace")
            if e.code == 429 or e.code >= 500:
                raise _Retry(f"HTTP {e.code} {e.reason}") from None
            raise RemoteRewardError(
                f"{self._where}: the server refused a batch with HTTP {e.code} {e.reason} "
                f"({_one_line(detail) or 'no detail'}); not retried: check the wire format in docs/rewards.md"
            ) from None
        except urllib.error.URLError as e:
            raise _Retry(self._reason(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:  # OSError holds TimeoutError and ConnectionError
            raise _Retry(self._reason(e)) from None
        finally:
            with self._lock:
                self.requests += 1
                self.seconds += time.monotonic() - started
        return self._scores(raw, expected)

    def _read(self, answer: http.client.HTTPResponse, deadline: float) -> bytes:
        """The whole body by `deadline`: urllib's timeout bounds each read, not the sum of them."""
        chunks = []
        while chunk := answer.read1(1 << 16):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError("the answer took longer than timeout_s to arrive")
        return b"".join(chunks)

    def _scores(self, raw: bytes, expected: int) -> list[float]:
        """The answer's scores as floats (NaN for null or non-finite); _Retry when it is malformed."""
        try:
            answer = json.loads(raw)
        except ValueError as e:  # also a body that is not UTF-8
            raise _Retry(f"the answer is not JSON ({e})") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise _Retry(f'the answer has no "scores" list: {_one_line(raw.decode("utf-8", "replace"))[:80]}')
        if len(scores) != expected:
            raise _Retry(f"the answer holds {len(scores)} scores for {expected} samples")
        for score in scores:
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise _Retry(f"a score is {_one_line(repr(score))[:40]}, not a number or null")
        values = [math.nan if s is None or not math.isfinite(s) else float(s) for s in scores]
        unscored = sum(math.isnan(v) for v in values)
        if unscored:
            with self._lock:
                self.failures += unscored
                first = self.failures == unscored
            (log.warning if first else log.debug)("%s: %d sample(s) answered without a score", self._where, unscored)
        return values

    def _reason(self, error: object) -> str:
        """A failed connection in a few words: `Connection refused`, `timed out after 30s`, ..."""
        if isinstance(error, TimeoutError) or str(error) == "timed out":
            return f"timed out after {self.cfg.timeout_s:g}s"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        return _one_line(f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error))


def _one_line(text: str) -> str:
    return " ".join(text.split())
