"""`openai_agent` episodes: the user's agent runs against an OpenAI-compatible endpoint on this worker, and
every call it makes is a request in the engine's loop (`VLLMEngine.submit/step/abort`, as episodes' turns are).

One thread does the work: the endpoint (aiohttp), the agents (asyncio tasks; a plain function runs on a
thread of its own) and the engine's loop all run on an event loop thread. A call is rendered and recorded
there (`agent_capture`) and queued for the engine's loop, a task of the same loop (`AgentRunner._episodes`),
which submits the calls, steps the engine, hands each finished sample back, and between steps lets the
agents run until each answered one has made its next call. The worker's generation thread waits on the
finished batches (`AgentRunner.stream`).
One endpoint per worker, on a free port of 127.0.0.1 (the agents run in this process), started with the
worker and stopped with it; each episode's client is bound to its own URL, `/episodes/ID/v1`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from contracts.config import SamplingConfig
from contracts.errors import first_line
from rollout.environments.openai_agent import OpenAIAgent, takes_base_url
from rollout.generation.agent_capture import (
    AgentEpisode,
    ChatRendering,
    RequestError,
    extends,
    normalize_messages,
    record_dict,
)
from rollout.generation.completions import Completion
from rollout.generation.engine import SampleOutput, VLLMEngine

MODEL_NAME = "policy"  # what /v1/models lists; any name is accepted in a request
START_TIMEOUT_S = 30.0
IDLE_WAIT_S = 0.05  # the engine's loop, with nothing in the engine, looks again at least this often
SETTLE_PASSES = 64


class AgentRunner:
    """The endpoint, the agents and the engine loop of one worker's `openai_agent` episodes."""

    def __init__(self, engine: VLLMEngine, cfg, tokenizer, *, worker: str = "rollout", max_model_len: int):
        """`cfg`: the `env` config section."""
        self.engine, self.cfg, self.tokenizer = engine, cfg, tokenizer
        self.settings = OpenAIAgent(**cfg.params)
        self.is_async = asyncio.iscoroutinefunction(self.settings.function)
        self.base_url_only = takes_base_url(self.settings.function)
        self.rendering = ChatRendering(tokenizer)
        self.worker, self.max_model_len = worker, max_model_len
        self.episodes: dict[str, AgentEpisode] = {}  # by id; touched on the event loop only
        self.calls: deque = deque()  # (episode, prompt ids, params, future): to the engine loop
        self.ended: deque[AgentEpisode] = deque()  # to the engine loop
        self.wake = asyncio.Event()  # the engine's loop waits on it with nothing in the engine
        self.threads = ThreadPoolExecutor(max_workers=cfg.num_threads, thread_name_prefix="agent")
        self.sampling: SamplingConfig | None = None  # the running stream's
        self.idle_seconds = 0.0
        self.env_errors = 0
        # Each call's time in the engine's loop (taken in, queued for room, submitted, finished), by response
        # id: what a client's time for the call adds on top is the endpoint's cost (benchmarks/agent_server.py).
        self.engine_waits: dict[str, float] = {}
        self.resumed_tokens = self.cached_tokens = 0
        self.env_seconds: list[float] = []  # kept for the worker's summary (agents have no steps)
        self._free_async_http: list = []  # httpx clients of episodes that ended, for the next ones (`_call_agent`)
        self._free_http: list = []
        self._ssl = None  # the clients' TLS context, shared (`_new_http`)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="agent-endpoint", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start_server(), self.loop).result(START_TIMEOUT_S)
        self.url = f"http://127.0.0.1:{self.port}"

    # -- the engine loop (a task on the event loop, beside the agents and the endpoint) ---------------

    def stream(self, batches, sampling: SamplingConfig, n: int):
        """Every batch's episodes ((records, prompt ids, seed) each; n per prompt) run by the agent; yields
        (batch index, [n Completions per prompt, in prompt order]) as each batch's episodes all end.

        The engine's loop runs on the event loop's thread (`_drive`), not the caller's: with the agents and
        the endpoint on one thread, a call reaches the engine and its sample reaches the agent without a
        thread's wake-up, and the two loops never take the interpreter from each other mid-step. The
        caller's thread waits on the finished batches."""
        self.sampling = sampling
        finished: queue.SimpleQueue = queue.SimpleQueue()
        driver = asyncio.run_coroutine_threadsafe(self._drive(batches, n, finished), self.loop)
        kind = None
        try:
            while kind != "done":
                try:
                    kind, item = finished.get(timeout=1.0)
                except queue.Empty:
                    if driver.done() and finished.empty():  # ended without a word: cancelled from elsewhere
                        driver.result(0)
                    continue
                if kind == "batch":
                    yield item
                elif kind == "error":
                    raise item
        finally:  # closed early, or raised: the driver stops its episodes, and no longer steps the engine
            if kind != "done":
                driver.cancel()
                _until_done(finished)

    async def _drive(self, batches, n: int, finished: queue.SimpleQueue) -> None:
        try:
            async for item in self._episodes(batches, n):
                finished.put(("batch", item))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the caller's thread raises it
            finished.put(("error", e))
        finally:
            finished.put(("done", None))

    async def _episodes(self, batches, n: int):
        results = [[[None] * n for _ in ids] for _, ids, _ in batches]
        left = [len(ids) * n for _, ids, _ in batches]
        for b in [b for b, count in enumerate(left) if count == 0]:
            yield b, []
        starting = deque(
            ((b, i, j), records[i], None if seed is None else (seed * 1_000_003 + i * 1_009 + j * 101) % 2**31)
            for b, (records, ids, seed) in enumerate(batches)
            for i in range(len(ids))
            for j in range(n)
        )
        running: set[AgentEpisode] = set()
        queued: deque = deque()  # calls waiting for room in the engine's window
        in_engine: dict[str, tuple[AgentEpisode, asyncio.Future, float]] = {}
        try:
            while starting or running:
                while starting and len(running) < 2 * self.engine.window:
                    place, record, seed = starting.popleft()
                    episode = AgentEpisode(place, record, seed, f"{self.worker}-{uuid.uuid4().hex[:16]}")
                    running.add(episode)
                    self._start_episode(episode)
                now = time.perf_counter()
                while self.calls:
                    queued.append((*self.calls.popleft(), now))
                while queued and len(in_engine) < self.engine.window:
                    episode, ids, params, future, taken = queued.popleft()
                    if episode.finish is None and not future.done():
                        in_engine[self.engine.submit(ids, params, episode)] = (episode, future, taken)
                if in_engine:
                    outputs = self.engine.step()
                    now = time.perf_counter()
                    for out in outputs:
                        episode, future, taken = in_engine.pop(out.id)
                        if out.prompt_tokens and episode.calls:
                            self.resumed_tokens += out.prompt_tokens
                            self.cached_tokens += out.cached_tokens
                        if not future.done():  # in the engine, and queued for room in it
                            future.set_result((out.samples[0], now - taken))
                    await self._settle()
                elif not self.calls and not self.ended:
                    start = time.perf_counter()
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), IDLE_WAIT_S)
                    except asyncio.TimeoutError:
                        pass
                    self.idle_seconds += time.perf_counter() - start
                    await self._settle()  # the other agents' calls too, not the first one's alone
                while self.ended:
                    episode = self.ended.popleft()
                    if episode not in running:  # an earlier stream's, stopped when that stream was closed
                        continue
                    running.discard(episode)
                    mine = [rid for rid, (e, _, _) in in_engine.items() if e is episode]
                    self.engine.abort(mine)
                    for rid in mine:
                        del in_engine[rid]
                    b, i, j = episode.place
                    results[b][i][j] = self._completion(episode)
                    left[b] -= 1
                    if left[b] == 0:
                        yield b, results[b]
                        results[b] = None
        finally:  # episodes left unfinished (the stream was closed, or raised): their agents are stopped
            self.engine.abort(list(in_engine))
            for episode in running:
                self._cancel(episode)

    async def _settle(self) -> None:
        """After an engine step: the agents and the endpoint run until the loop has nothing ready, so the
        answered calls' agents make their next calls before the engine steps again (the next step takes
        them in together, as `EpisodeRunner`'s takes the environments' answers). Bounded, so that agents
        that keep the loop busy cannot hold the engine back."""
        ready = getattr(self.loop, "_ready", None)  # asyncio's own run queue: CPython's loops have one
        for _ in range(SETTLE_PASSES):
            await asyncio.sleep(0)  # one pass of the loop: its I/O polled without blocking, its callbacks run
            if ready is not None and not ready:  # nothing polled, nothing scheduled: the loop is idle
                return

    def close(self) -> None:
        """Stop the endpoint and the event loop (the worker is going away)."""
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop_server(), self.loop).result(START_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(START_TIMEOUT_S)
            self.threads.shutdown(wait=False, cancel_futures=True)

    def _completion(self, episode: AgentEpisode) -> Completion:
        """The episode's last segment, its earlier ones in `earlier_segments`; the agent's reward goes to the
        reward workers (component `agent`), on every segment or the last one's (`reward_to`)."""
        if episode.finish == "env_error":
            self.env_errors += 1
        every = self.settings.reward_to == "all_segments"
        earlier = [
            Completion(
                token_ids=s.response,
                logprobs=s.logprobs,
                text=self.tokenizer.decode(s.response, skip_special_tokens=False),
                finish_reason=s.finish,
                mask=s.mask,
                num_turns=s.calls,
                final_text=s.final_text,
                prompt_ids=s.prompt_ids,
                prompt=s.prompt_text,
                episode_id=episode.id,
                segment=k,
                agent_reward=episode.reward,
                takes_reward=every,
            )
            for k, s in enumerate(episode.segments)
        ]
        return Completion(
            token_ids=episode.response,
            logprobs=episode.logprobs,
            text=self.tokenizer.decode(episode.response, skip_special_tokens=False),
            finish_reason=episode.finish or "error",
            mask=episode.mask,
            num_turns=episode.segment_calls,
            final_text=episode.final_text,
            env_error=episode.error,
            prompt_ids=episode.prompt_ids,
            prompt=episode.prompt_text if episode.prompt_ids is not None else None,
            episode_id=episode.id,
            segment=len(earlier),
            agent_reward=episode.reward,
            earlier_segments=earlier,
        )

    # -- the agents (event loop) --------------------------------------------------------------------

    def _start_episode(self, episode: AgentEpisode) -> None:
        self.episodes[episode.id] = episode
        episode.task = self.loop.create_task(self._run_agent(episode))

    def _cancel(self, episode: AgentEpisode) -> None:
        episode.end("error", "the episode was stopped before its agent finished")
        if episode.task is not None:
            episode.task.cancel()
        self.episodes.pop(episode.id, None)

    async def _run_agent(self, episode: AgentEpisode) -> None:
        name = self.settings.agent_name
        timeout = self.settings.episode_timeout_s
        try:
            reward = await asyncio.wait_for(self._call_agent(episode), timeout)
        except asyncio.TimeoutError:
            episode.end("env_error", f"agent {name} took more than env.params.episode_timeout_s ({timeout:g}s)")
        except asyncio.CancelledError:
            episode.end("error", "the episode was stopped before its agent finished")
            raise
        except Exception as e:  # noqa: BLE001 - an agent's error ends its episode, not the run
            episode.end("env_error", f"agent {name} raised {type(e).__name__}: {first_line(e)}")
        else:
            if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
                episode.end("env_error", f"agent {name} returned {type(reward).__name__}, not a number or None")
            elif episode.calls == 0:
                episode.end("env_error", f"agent {name} made no call to the model")
            else:
                episode.reward = None if reward is None else float(reward)
                episode.end(episode.last_finish)
        finally:
            self.episodes.pop(episode.id, None)
            self.ended.append(episode)
            self.wake.set()

    async def _call_agent(self, episode: AgentEpisode):
        url = f"{self.url}/episodes/{episode.id}/v1"
        function, record = self.settings.function, record_dict(episode.record)
        params = self.settings.agent_params
        if self.base_url_only:
            if self.is_async:
                return await function(url, record, **params)
            return await self.loop.run_in_executor(self.threads, functools.partial(function, url, record, **params))
        # Each running episode has a connection pool of its own, kept for a later episode when it ends: httpx
        # looks through every connection of a pool for each request it sends (twice over for its idle ones),
        # so one pool shared by hundreds of agents took most of the endpoint's time.
        free = self._free_async_http if self.is_async else self._free_http
        http = free.pop() if free else self._new_http()
        try:
            if self.is_async:
                return await function(self._async_client(url, http), record, **params)
            client = self._client(url, http)
            return await self.loop.run_in_executor(self.threads, functools.partial(function, client, record, **params))
        finally:
            free.append(http)

    def _new_http(self):
        import httpx

        if self._ssl is None:  # made once: loading the CA certificates is most of making a client
            self._ssl = httpx.create_ssl_context()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=8)
        # trust_env off: the endpoint is this process's own, never reached through a proxy or with .netrc's auth.
        kind = httpx.AsyncClient if self.is_async else httpx.Client
        return kind(limits=limits, timeout=None, verify=self._ssl, trust_env=False)

    def _async_client(self, url: str, http):
        import openai

        # No retries: a refused call (409 after the episode ended, 400) is the agent's to see, at once.
        return openai.AsyncOpenAI(
            base_url=url,
            api_key="rollout",
            max_retries=0,
            timeout=self.settings.episode_timeout_s,
            http_client=http,
        )

    def _client(self, url: str, http):
        import openai

        return openai.OpenAI(
            base_url=url,
            api_key="rollout",
            max_retries=0,
            timeout=self.settings.episode_timeout_s,
            http_client=http,
        )

    # -- the endpoint (event loop) ------------------------------------------------------------------

    async def _start_server(self) -> int:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/episodes/{episode}/v1/chat/completions", self._chat)
        app.router.add_post("/episodes/{episode}/v1/completions", self._text_completion)
        app.router.add_get("/episodes/{episode}/v1/models", self._models)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._no_episode)
        app.router.add_post("/v1/completions", self._no_episode)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _stop_server(self) -> None:
        for episode in list(self.episodes.values()):
            self._cancel(episode)
        await self._runner.cleanup()
        while self._free_async_http:
            await self._free_async_http.pop().aclose()
        while self._free_http:
            self._free_http.pop().close()

    async def _models(self, request):
        from aiohttp import web

        return web.json_response(
            {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "rollout"}]}
        )

    async def _no_episode(self, request):
        return _error(RequestError(404, "calls go to an episode's base_url (/episodes/ID/v1), given to its agent"))

    async def _chat(self, request):
        return await self._serve(request, chat=True)

    async def _text_completion(self, request):
        return await self._serve(request, chat=False)

    async def _serve(self, request, *, chat: bool):
        from aiohttp import web

        try:
            episode = self.episodes.get(request.match_info["episode"])
            if episode is None:
                raise RequestError(404, f"unknown episode {request.match_info['episode']!r}", "not_found_error")
            try:
                body = await request.json(loads=json.loads)
            except ValueError:
                raise RequestError(400, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            self._check_open(episode)
            if episode.busy:
                raise RequestError(409, "this episode has a call in flight; an episode's calls are made one at a time")
            if episode.calls >= self.cfg.max_turns:
                episode.end(
                    "env_error",
                    f"agent {self.settings.agent_name} made more than env.max_turns ({self.cfg.max_turns}) calls",
                )
                raise RequestError(409, f"this episode ended: more than env.max_turns ({self.cfg.max_turns}) calls")
            call = self._chat_call(episode, body) if chat else self._text_call(episode, body)
            ids, added, params, history, tools_key = call
            future = self.loop.create_future()
            episode.busy, episode.pending = True, future
            try:
                self.calls.append((episode, ids, params, future))
                self.wake.set()
                sample, wait = await future
            finally:
                episode.busy, episode.pending = False, None
            self._check_open(episode)  # it ended while the engine ran this call (time-out): not recorded
            text = self._record(episode, ids, added, sample, history, tools_key, chat)
            payload = self._payload(episode, body, ids, sample, text, chat)
            if len(self.engine_waits) < 100_000:  # bounded: a long-lived worker keeps only the first
                self.engine_waits[payload["id"]] = wait
            return web.json_response(payload)
        except RequestError as e:
            return _error(e)

    def _check_open(self, episode: AgentEpisode) -> None:
        if episode.finish is not None:
            raise RequestError(
                409, f"this episode ended ({episode.finish}); start a new episode for more calls", "conflict"
            )

    def _sampling(self, body: dict, room: int):
        """The call's sampling: the rollout's, with the request's temperature, top_p and stop; its
        max_tokens capped by the rollout's and by what is left of the episode's tokens."""
        sampling = self.sampling
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1: each call is one sample of the episode")
        if body.get("stream"):
            raise RequestError(400, "stream is not served: make the call with stream false")
        changes: dict[str, Any] = {}
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        if asked is not None:
            if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
                raise RequestError(400, f"max_tokens must be a whole number >= 1, got {asked!r}")
        changes["max_tokens"] = min(sampling.max_tokens, room, asked or sampling.max_tokens)
        for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise RequestError(400, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}")
            if key == "top_p" and value == 0:
                raise RequestError(400, "top_p must be > 0")
            changes[key] = float(value)
        stop = body.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
                raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings")
            changes["stop"] = [*sampling.stop, *stop]
        return msgspec.structs.replace(sampling, **changes)

    def _params(self, episode: AgentEpisode, body: dict, prompt_len: int, added: int, *, fresh: bool = False):
        """`fresh`: the call starts a new segment, whose row holds none of the episode's tokens so far."""
        room = min(
            self.cfg.max_episode_tokens - (0 if fresh else len(episode.response) + added),
            self.max_model_len - prompt_len,
        )
        if room < 1:
            if episode.calls:
                episode.end("length")
            raise RequestError(
                400,
                f"this call's prompt is {prompt_len} tokens: no room left to generate (rollout.max_model_len "
                f"{self.max_model_len}, env.max_episode_tokens {self.cfg.max_episode_tokens})",
                "context_length_exceeded",
            )
        sampling = self._sampling(body, room)
        seed = None if episode.seed is None else episode.seed + episode.calls
        return self.engine.sampling_params(sampling, 1, seed, one_request=True)

    def _chat_call(self, episode: AgentEpisode, body: dict):
        messages = normalize_messages(body.get("messages"))
        tools = body.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise RequestError(400, "tools must be a list")
        if body.get("tool_choice") == "none":
            tools = None  # the model is not told of tools it may not call
        tools_key = json.dumps(tools, sort_keys=True)
        text = None
        if episode.history is not None and tools_key == episode.tools_key and extends(episode.history, messages):
            text = self.rendering.added(episode.history, messages, tools, episode.reply_ended)
        if text is None:  # the episode's first call, or a fresh context: a new segment (`_record`)
            ids = self.rendering.ids(self.rendering.text(messages, tools, generation=True))
            added = None
        else:
            added = self.rendering.ids(text)
            ids = episode.prompt_ids + episode.response + added
        params = self._params(episode, body, len(ids), len(added or ()), fresh=added is None)
        return ids, added, params, messages, tools_key

    def _text_call(self, episode: AgentEpisode, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string (one prompt per call)")
        history = episode.history
        if isinstance(history, str) and prompt.startswith(history):
            added = self.tokenizer(prompt[len(history) :], add_special_tokens=False)["input_ids"]
            ids = episode.prompt_ids + episode.response + added
        else:  # the episode's first call, or a fresh context: a new segment (`_record`)
            ids = self.tokenizer(prompt)["input_ids"]
            added = None
        params = self._params(episode, body, len(ids), len(added or ()), fresh=added is None)
        return ids, added, params, prompt, ""

    def _record(self, episode, ids, added, sample: SampleOutput, history, tools_key, chat: bool) -> str:
        """The call captured: its prompt (a segment's first call; `added` None) or the added context (mask 0),
        then the sampled tokens as they were sampled (mask 1). Returns the reply's text."""
        if added is None:
            if episode.prompt_ids is not None:  # a fresh context: the segment so far is a row of its own
                episode.new_segment()
            episode.prompt_ids = list(ids)
            episode.prompt_text = self.tokenizer.decode(ids, skip_special_tokens=False)
        else:
            episode.response += added
            episode.logprobs += [0.0] * len(added)
            episode.mask += [0] * len(added)
        episode.response += sample.token_ids
        episode.logprobs += sample.logprobs
        episode.mask += [1] * len(sample.token_ids)
        episode.calls += 1
        episode.segment_calls += 1
        episode.last_finish = sample.finish_reason or "error"
        eos = self.tokenizer.eos_token_id
        episode.reply_ended = bool(sample.token_ids) and sample.token_ids[-1] == eos
        text = self.engine.completion_text(sample.text, sample.token_ids)
        episode.final_text = text
        episode.tools_key = tools_key
        if chat:
            episode.history = history  # the reply is added by `_payload`, as the agent gets it
        else:
            episode.history = history + text
        return text

    def _payload(self, episode, body, ids, sample: SampleOutput, text: str, chat: bool) -> dict:
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(sample.token_ids),
            "total_tokens": len(ids) + len(sample.token_ids),
        }
        finish = "length" if sample.finish_reason == "length" else "stop"
        common = {
            "id": f"{episode.id}-{episode.calls}",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_NAME,
        }
        if not chat:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {**common, "object": "text_completion", "choices": [choice], "usage": usage}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if body.get("tools") and body.get("tool_choice") != "none":
            content, calls = self.settings.parse_tool_calls(text)
            if calls:
                for k, call in enumerate(calls):
                    call["id"] = f"call_{episode.calls}_{k}"  # unique in the episode
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        episode.history = [*episode.history, normalize_messages([message])[0]]
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**common, "object": "chat.completion", "choices": [choice], "usage": usage}


def _until_done(finished: queue.SimpleQueue) -> None:
    """Until a cancelled driver has put its last word (its `finally` ran): the engine is the caller's again."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if finished.get(timeout=0.1)[0] == "done":
                return
        except queue.Empty:
            pass
    raise RuntimeError(f"the agents' engine loop did not stop within {START_TIMEOUT_S:g}s")


def _error(error: RequestError):
    from aiohttp import web

    body = {"error": {"message": error.message, "type": error.kind, "param": None, "code": error.status}}
    return web.json_response(body, status=error.status)
