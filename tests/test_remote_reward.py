"""A reward server of your own (`reward.remote`), against a real HTTP server on a local port: batches,
retries with back-off, time-outs, a server that is down, the cap on requests in flight, and the
`remote` component a `RewardWorker` adds. Assertions are on counters, never on a stopwatch."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow as pa
import pytest

from contracts.config import ConfigError, RemoteRewardConfig, RewardConfig, RuleSpec
from contracts.formats import Message, PromptRecord
from reward.checks import check_reward_config
from reward.remote import RemoteRewardError, RemoteScorer
from reward.worker import RewardWorker


def by_length(samples: list[dict[str, Any]], request: int) -> object:
    """The test server's scoring: the length of each response."""
    return {"scores": [float(len(s["response"])) for s in samples]}


class RewardServer(ThreadingHTTPServer):
    """A reward server on a free local port that counts what it sees. It answers `answer(samples,
    request number)`; the first `fail_first` requests get `fail_status`; with `hold_for` set, each
    request waits (up to 2 s) for that many to be open at once and then a moment for more, so a client
    that opened too many would be seen doing it; with `slow`, each request waits until the test ends."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.more = threading.Condition(self.lock)
        self.requests = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.samples: list[dict[str, Any]] = []
        self.answer: Callable[[list[dict[str, Any]], int], object] = by_length
        self.fail_first, self.fail_status = 0, 503
        self.hold_for: int | None = None
        self.slow = False
        self.released = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/score"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a slow answer closed its socket: expected here


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_POST(self) -> None:
        samples = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["samples"]
        server = self.server
        with server.more:
            server.requests += 1
            number = server.requests
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
            server.samples.extend(samples)
            server.more.notify_all()
            if server.hold_for is not None:  # until the cap is reached (a loaded machine is slow to get there),
                server.more.wait_for(lambda: server.in_flight >= server.hold_for, timeout=2.0)
                server.more.wait_for(lambda: server.in_flight > server.hold_for, timeout=0.2)  # then passed?
        try:
            if server.slow:
                server.released.wait(30)
            if number <= server.fail_first:
                self._send(server.fail_status, b'{"error": "not ready"}')
            else:
                answer = server.answer(samples, number)
                self._send(200, answer if isinstance(answer, bytes) else json.dumps(answer).encode())
        finally:
            with server.lock:
                server.in_flight -= 1

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = RewardServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.released.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def remote(url: str, **fields) -> RemoteRewardConfig:
    """Tiny back-off, so that retries cost nothing."""
    return RemoteRewardConfig(url=url, **{"backoff_s": 0.001, **fields})


def samples(*responses: str) -> list[dict[str, Any]]:
    return [{"prompt": "q", "response": r, "reference": None, "metadata": {}} for r in responses]


def test_samples_are_scored_in_batches_and_in_order(server: RewardServer) -> None:
    scorer = RemoteScorer(remote(server.url, batch_size=3))
    responses = ["a", "bb", "", "dddd", "eeeee", "ffffff", "ggggggg"]
    assert scorer.score(samples(*responses)) == [float(len(r)) for r in responses]
    assert server.requests == scorer.requests == 3  # 3 + 3 + 1
    assert sorted(s["response"] for s in server.samples) == sorted(responses)  # batches arrive in any order
    assert scorer.score([]) == [] and server.requests == 3
    scorer.close()


def test_a_sample_answered_null_or_non_finite_is_a_failed_score(server: RewardServer) -> None:
    server.answer = lambda samples, request: b'{"scores": [null, NaN, 2.5, -Infinity]}'
    scorer = RemoteScorer(remote(server.url))
    scores = scorer.score(samples("a", "b", "c", "d"))
    assert [math.isnan(s) for s in scores] == [True, True, False, True] and scores[2] == 2.5
    assert scorer.failures == 3 and server.requests == 1


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_server_failing_at_first_is_retried_until_it_answers(server: RewardServer, status: int) -> None:
    server.fail_first, server.fail_status = 2, status
    scorer = RemoteScorer(remote(server.url, max_retries=3))
    assert scorer.score(samples("abc")) == [3.0]
    assert server.requests == 3 and scorer.retries == 2


@pytest.mark.parametrize(
    "bad",
    [b"<html>busy</html>", {"scores": [1.0]}, {"score": [1.0, 2.0]}, [1.0, 2.0], {"scores": ["1", 2.0]}],
    ids=["not-json", "wrong-length", "no-scores", "a-list", "a-string"],
)
def test_a_malformed_answer_is_retried(server: RewardServer, bad: object) -> None:
    server.answer = lambda samples, request: bad if request == 1 else by_length(samples, request)
    scorer = RemoteScorer(remote(server.url, max_retries=1))
    assert scorer.score(samples("a", "bb")) == [1.0, 2.0]
    assert server.requests == 2


def test_a_malformed_answer_every_time_fails_naming_it(server: RewardServer) -> None:
    server.answer = lambda samples, request: {"scores": []}
    with pytest.raises(RemoteRewardError, match=r"no answer after 3 tries \(last: the answer holds 0 scores for 1"):
        RemoteScorer(remote(server.url, max_retries=2)).score(samples("a"))
    assert server.requests == 3


def test_a_4xx_is_not_retried(server: RewardServer) -> None:
    server.fail_first, server.fail_status = 10, 400
    with pytest.raises(RemoteRewardError) as e:
        RemoteScorer(remote(server.url, max_retries=3)).score(samples("a"))
    assert server.requests == 1
    message = str(e.value)
    assert message.startswith(f"reward.remote.url {server.url}: the server refused a batch with HTTP 400")
    assert '{"error": "not ready"}' in message and "not retried" in message and "\n" not in message


def test_a_server_slower_than_the_timeout_fails_after_its_retries(server: RewardServer) -> None:
    server.slow = True
    scorer = RemoteScorer(remote(server.url, timeout_s=0.2, max_retries=1))
    with pytest.raises(RemoteRewardError, match=r"no answer after 2 tries \(last: timed out after 0.2s\)"):
        scorer.score(samples("a"))
    assert server.requests == 2 and scorer.requests == 2


def test_a_server_that_is_down_fails_with_one_line_naming_the_url() -> None:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/score"
    scorer = RemoteScorer(remote(url, max_retries=2))
    with pytest.raises(RemoteRewardError) as e:
        scorer.score(samples("a", "b"))
    assert str(e.value) == (
        f"reward.remote.url {url}: no answer after 3 tries (last: Connection refused); "
        "check the server or raise reward.remote.max_retries"
    )
    assert scorer.requests == 3 and scorer.retries == 2


def test_no_more_requests_are_open_at_once_than_max_in_flight(server: RewardServer) -> None:
    server.hold_for = 2
    scorer = RemoteScorer(remote(server.url, batch_size=2, max_in_flight=2))
    responses = ["x" * i for i in range(12)]
    assert scorer.score(samples(*responses)) == [float(i) for i in range(12)]
    assert server.requests == 6  # three times the cap
    assert server.most_in_flight == 2  # the cap was reached, never passed


# --- the reward worker and the config -----------------------------------------------------------


def record(prompt_id: str, prompt: str, reference: str | None) -> PromptRecord:
    return PromptRecord(prompt_id, [Message("user", prompt)], reference, {"source": prompt_id}, "test:1")


def test_the_reward_worker_adds_the_remote_component_after_the_rules(server: RewardServer) -> None:
    cfg = RewardConfig(rules=[RuleSpec(name="arithmetic")], remote=remote(server.url, weight=0.5), failed_value=-1.0)
    server.answer = lambda samples, request: {"scores": [None if s["response"] == "?" else 2.0 for s in samples]}
    worker = RewardWorker(cfg)
    assert worker.components == ("arithmetic", "remote")
    batch = pa.record_batch({"prompt_id": ["a", "b", "a"], "prompt": ["<|user|>1+1="] * 3, "response": ["2", "3", "?"]})
    rewards, seconds = worker.score_batch(batch, [record("a", "1+1=", "2"), record("b", "1+1=", None)])
    assert rewards.column("reward_components").to_pylist() == [
        {"arithmetic": 1.0, "remote": 2.0},
        {"arithmetic": 0.0, "remote": 2.0},
        {"arithmetic": 0.0, "remote": pytest.approx(math.nan, nan_ok=True)},
    ]
    assert rewards.column("reward").to_pylist() == [2.0, 1.0, -1.0]  # weight 0.5; failed_value for the null
    assert server.samples == [  # the final user turn, without template markup, with its record
        {"prompt": "1+1=", "response": "2", "reference": "2", "metadata": {"source": "a"}},
        {"prompt": "1+1=", "response": "3", "reference": None, "metadata": {"source": "b"}},
        {"prompt": "1+1=", "response": "?", "reference": "2", "metadata": {"source": "a"}},
    ]
    assert "remote" in seconds and worker.progress() == 3 + 1  # samples ruled, requests sent
    worker.close()


def test_a_reward_worker_whose_server_stays_down_fails_the_call() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    worker = RewardWorker(RewardConfig(rules=[], remote=remote(url, max_retries=1)))
    batch = pa.record_batch({"prompt_id": ["a"], "prompt": ["p"], "response": ["r"]})
    with pytest.raises(RemoteRewardError, match=f"reward.remote.url {url}: no answer after 2 tries"):
        worker.score_batch(batch, [record("a", "p", None)])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"url": "localhost:8000/score"}, r"reward.remote.url: 'localhost:8000/score' is not an http\(s\) URL"),
        ({"url": "ftp://host/score"}, "reward.remote.url: 'ftp://host/score' is not an http"),
        ({"url": "http://host:99999/score"}, "reward.remote.url: 'http://host:99999/score' is not a URL"),
        ({"url": "http://host/score", "timeout_s": 300.0}, r"reward.remote.timeout_s \(300\) is not below"),
    ],
)
def test_a_bad_server_setting_is_a_config_error_naming_its_field(fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_reward_config(RewardConfig(remote=RemoteRewardConfig(**fields)))


def test_a_scorer_built_without_the_start_up_check_refuses_a_bad_url_too() -> None:
    with pytest.raises(ValueError, match="reward.remote.url: 'scorer:8000' is not an http"):
        RemoteScorer(RemoteRewardConfig(url="scorer:8000"))


def test_a_good_server_setting_passes() -> None:
    check_reward_config(RewardConfig(rules=[], remote=RemoteRewardConfig(url="https://scorer.internal:8443/v1/score")))
