"""Episodes: model turns with an environment's turns between them, many in flight in one engine.

`EpisodeRunner.stream` is `completions.stream_completions` for episodes: every (prompt, sample) of the batches is an
episode with an environment instance of its own; each model turn is one engine request, and the
environment's `reset` and `step` run on a thread pool, off the engine loop. While an episode waits for
its environment, the engine keeps stepping the others, and a waiting one re-enters as soon as its
environment answers: the engine drains only when every episode in flight waits. Each later turn's
prompt is the episode so far, whose earlier turns' KV cache prefix caching keeps.

An episode ends when the environment says `done` (finish_reason `stop`, or `length` for a cut turn), at
`env.max_turns` model turns (`max_turns`), at `env.max_episode_tokens` (`length`), or when its
environment raises or runs past `env.step_timeout_s` (`env_error`, the error's first line kept).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts.config import SamplingConfig
from contracts.environment import StepResult
from contracts.errors import first_line
from contracts.formats import Message
from contracts.rendering import PromptRenderer
from rollout.generation.completions import Completion
from rollout.generation.engine import SampleOutput, VLLMEngine
from rollout.generation.env_processes import EnvironmentHosts


@dataclass
class Episode:
    place: tuple[int, int, int]  # (batch, prompt, sample)
    record: Any
    prompt_ids: list[int]
    seed: int | None
    env: Any = None
    history: list[Message] = field(default_factory=list)  # the conversation so far, as messages
    prompt_text: str | None = None  # set when `reset` added a turn to the task's prompt
    own_prompt: bool = False
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turns: int = 0
    final_text: str = ""
    last_turn_start: int = 0  # where the model's last turn begins in `response`
    last_turn_text: str = ""  # the engine's text of it, where it writes one (stop strings)
    last_finish: str = "stop"
    reward_at: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None


class EpisodeRunner:
    def __init__(self, engine: VLLMEngine, env_class: type, cfg, tokenizer):
        """`env_class`: the configured `Environment`; `cfg`: the `env` config section."""
        self.engine, self.env_class, self.cfg = engine, env_class, cfg
        self.tokenizer = tokenizer
        self.renderer = PromptRenderer(tokenizer, max_prompt_tokens=2**31)
        self.pool = ThreadPoolExecutor(max_workers=cfg.num_threads, thread_name_prefix="env-step")
        # With env.num_processes, the environments live in host processes; the threads wait on them.
        self.hosts = EnvironmentHosts(env_class, cfg) if cfg.num_processes else None
        # Beside the engine's own step and intake time (`engine.step_seconds`, `engine.intake_seconds`): waiting
        # with every episode at its environment, the stall the thread pool is there to avoid.
        self.idle_seconds = 0.0
        self.env_seconds: list[float] = []  # each environment call's wall time, for the metrics
        self.env_errors = 0
        # Later turns' prompts (the episode so far) in tokens, and how many of them the prefix cache served.
        self.resumed_tokens = 0
        self.cached_tokens = 0

    def stream(self, batches: list[tuple[list[Any], list[list[int]], int | None]], sampling: SamplingConfig, n: int):
        """Every batch's episodes ((records, prompt ids, seed) each; n per prompt) through the engine; yields
        (batch index, [n Completions per prompt, in prompt order]) as each batch's episodes all end."""
        results = [[[None] * n for _ in ids] for _, ids, _ in batches]
        left = [len(ids) * n for _, ids, _ in batches]
        for b in [b for b, count in enumerate(left) if count == 0]:
            yield b, []
        starting: deque[Episode] = deque(
            Episode((b, i, j), records[i], list(ids[i]), _seed(seed, i, j))
            for b, (records, ids, seed) in enumerate(batches)
            for i in range(len(ids))
            for j in range(n)
        )
        ready: deque[Episode] = deque()  # to generate their next turn
        in_env = _EnvironmentCalls(self.pool)  # waiting for their environment
        in_engine: dict[str, Episode] = {}  # by request id
        try:
            while starting or ready or in_env or in_engine:
                # New episodes start as room frees up, so the environments made stay those in flight.
                while starting and len(in_env) + len(in_engine) + len(ready) < 2 * self.engine.window:
                    episode = starting.popleft()
                    if self.hosts is not None:  # given out here, in the episodes' order, not the threads'
                        episode.env = self.hosts.make()
                    in_env.submit(self._reset, episode)
                self._feed(ready, in_engine, sampling)
                if in_engine:
                    self._step_engine(in_engine, in_env)
                elif in_env:  # every episode waits on its environment: nothing for the engine to do
                    start = time.perf_counter()
                    in_env.wait(timeout=0.05)
                    self.idle_seconds += time.perf_counter() - start
                for episode, future in in_env.collect(self.cfg.step_timeout_s):
                    self._environment_turn(episode, future)
                    if episode.finish is None:
                        ready.append(episode)
                        continue
                    b, i, j = episode.place
                    results[b][i][j] = self._completion(episode)
                    self._release(episode)
                    left[b] -= 1
                    if left[b] == 0:
                        yield b, results[b]
                        results[b] = None
        finally:  # episodes left unfinished (the stream was closed, or raised) let their environments go
            self.engine.abort(list(in_engine))
            for episode in [*ready, *in_env.episodes(), *in_engine.values()]:
                self._release(episode)

    def _feed(self, ready: deque[Episode], in_engine: dict[str, Episode], sampling: SamplingConfig) -> None:
        """Ready episodes' next turns into the engine, as many as its window has room for; each turn is a
        request whose prompt is the episode so far."""
        for _ in range(min(len(ready), max(0, self.engine.window - len(in_engine)))):
            episode = ready.popleft()
            request = self.engine.submit(
                episode.prompt_ids + episode.response, self._params(sampling, episode), episode
            )
            in_engine[request] = episode

    def _step_engine(self, in_engine: dict[str, Episode], in_env: _EnvironmentCalls) -> None:
        """One engine step; each episode whose turn it ended goes to its environment."""
        for out in self.engine.step():
            episode = in_engine.pop(out.id)
            if episode.turns:
                self.resumed_tokens += out.prompt_tokens
                self.cached_tokens += out.cached_tokens
            self._model_turn(episode, out.samples[0])
            in_env.submit(self._step, episode)

    def close(self) -> None:
        """Stop the environments' host processes, if any (they also stop when this process ends)."""
        if self.hosts is not None:
            self.hosts.close()

    # -- one episode's turns ------------------------------------------------------------------------

    def _timed(self, call, *args):
        """`call(*args)` (an environment's), its wall time kept for the metrics (`env_step_seconds`)."""
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.env_seconds.append(time.perf_counter() - start)

    def _reset(self, episode: Episode) -> tuple[StepResult, None] | None:
        """In the pool: the episode's environment made, and reset; its turn, if any, as an observation."""
        if episode.env is None:
            episode.env = self.env_class(**self.cfg.params)
        episode.history = list(self.env_class.opening(episode.record))
        extra = self._timed(episode.env.reset, episode.record)
        return None if extra is None else (StepResult(observation=extra), None)

    def _step(self, episode: Episode) -> tuple[StepResult, list[int] | None]:
        """In the pool: the environment's answer to the model's turn, and the tokens of its observation
        when the episode goes on (rendered here, off the engine loop)."""
        turn = episode.response[episode.last_turn_start :]
        episode.final_text = self.engine.completion_text(episode.last_turn_text, turn)  # decoded off the engine loop
        result = self._timed(episode.env.step, episode.final_text)
        if result.done or episode.turns >= self.cfg.max_turns:
            return result, None
        ended = episode.response[-1] == self.tokenizer.eos_token_id  # the model wrote its turn's eos
        return result, self._observation_ids(result.observation or "", ended)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one runner per worker, for the worker's life
    def _observation_ids(self, observation: str, reply_ended: bool) -> tuple[int, ...]:
        """The tokens after a model turn through `observation` to the next turn's opening. What the template
        writes between two turns does not depend on what came before, so a two-turn conversation stands for
        every episode's (and the same observation is rendered once)."""
        text = self.renderer.observation_text(
            _STAND_IN, "x", Message(self.cfg.observation_role, observation), reply_ended=reply_ended
        )
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _model_turn(self, episode: Episode, turn: SampleOutput) -> None:
        episode.last_turn_start, episode.last_turn_text = len(episode.response), turn.text
        episode.response += turn.token_ids
        episode.logprobs += turn.logprobs
        episode.mask += [1] * len(turn.token_ids)
        episode.turns += 1
        episode.last_finish = turn.finish_reason or "error"

    def _environment_turn(self, episode: Episode, future: Future) -> None:
        """The environment's answer (to `reset` or to the model's last turn), applied: the episode ends, or
        takes the observation's tokens and is ready for its next turn."""
        if not future.done():
            self._fail(episode, f"{self._name()} took more than env.step_timeout_s ({self.cfg.step_timeout_s:g}s)")
            return
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 - an environment's error ends its episode, not the run
            kind = getattr(e, "kind", type(e).__name__)  # a hosted environment's, by its own class
            self._fail(episode, f"{self._name()} raised {kind}: {first_line(e)}")
            return
        if episode.turns == 0:  # reset: a turn added to the prompt, or the prompt as it is
            result = result[0] if result is not None else None
            if result is not None:
                episode.history.append(Message(self.cfg.observation_role, result.observation))
                text = self.renderer.text(episode.record, episode.history)
                episode.prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                episode.prompt_text, episode.own_prompt = text, True
            return
        result, ids = result
        if result.reward is not None:  # on the last token of the turn it judges
            episode.reward_at.append(len(episode.response) - 1)
            episode.rewards.append(float(result.reward))
        if result.done:
            episode.finish = episode.last_finish
        elif episode.turns >= self.cfg.max_turns:
            episode.finish = "max_turns"
        else:
            if len(episode.response) + len(ids) >= self.cfg.max_episode_tokens:
                episode.finish = "length"  # no room for the observation and a model turn after it
                return
            episode.response += list(ids)
            episode.logprobs += [0.0] * len(ids)
            episode.mask += [0] * len(ids)

    def _release(self, episode: Episode) -> None:
        """A hosted environment is let go when its episode ends (one made here goes with the episode)."""
        if self.hosts is not None and episode.env is not None:
            episode.env.close()

    def _fail(self, episode: Episode, error: str) -> None:
        episode.finish, episode.error = "env_error", error
        self.env_errors += 1

    def _params(self, sampling: SamplingConfig, episode: Episode):
        """One sample of the next turn, within what is left of the episode's tokens, seeded per turn."""
        room = min(sampling.max_tokens, self.cfg.max_episode_tokens - len(episode.response))
        seed = None if episode.seed is None else episode.seed + episode.turns
        return self.engine.sampling_params(
            msgspec.structs.replace(sampling, max_tokens=room), 1, seed, one_request=True
        )

    def _completion(self, episode: Episode) -> Completion:
        return Completion(
            token_ids=episode.response,
            logprobs=episode.logprobs,
            text=self.tokenizer.decode(episode.response, skip_special_tokens=False),  # whose turn is whose, shown
            finish_reason=episode.finish,
            mask=episode.mask,
            num_turns=episode.turns,
            final_text=episode.final_text,
            turn_reward_at=episode.reward_at,
            turn_rewards=episode.rewards,
            env_error=episode.error,
            prompt_ids=episode.prompt_ids if episode.own_prompt else None,
            prompt=episode.prompt_text,
        )

    def _name(self) -> str:
        return f"environment {self.cfg.name}"


class _EnvironmentCalls:
    """The environment calls in flight on the pool, one per waiting episode. The pool's threads hand each
    call back as it ends, so the engine's loop never goes through the calls still running to find those
    that ended (with hundreds waiting, that took ~4% of its time)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.waiting: dict[Future, tuple[Episode, float]] = {}  # in the order the calls started
        self.answered: deque[Future] = deque()  # appended to by the pool's threads
        self.wake = threading.Event()

    def __len__(self) -> int:
        return len(self.waiting)

    def submit(self, call, episode: Episode) -> None:
        future = self.pool.submit(call, episode)
        self.waiting[future] = (episode, time.monotonic())  # before the callback, which may run at once
        future.add_done_callback(self._answer)

    def _answer(self, future: Future) -> None:
        self.answered.append(future)
        self.wake.set()

    def wait(self, timeout: float) -> None:
        """Until a call ends, or `timeout` seconds."""
        self.wake.clear()
        if not self.answered:
            self.wake.wait(timeout)

    def collect(self, timeout_s: float) -> list[tuple[Episode, Future]]:
        """The calls that ended, then those running past `timeout_s` (their futures not done): each with its
        episode, and no longer waited on."""
        out = []
        while self.answered:
            future = self.answered.popleft()
            if future in self.waiting:  # not one given up on as late before it ended
                out.append((self.waiting.pop(future)[0], future))
        now, late = time.monotonic(), []
        for future, (_, started) in self.waiting.items():  # oldest first: the first in time ends the scan
            if now - started <= timeout_s:
                break
            late.append(future)
        return out + [(self.waiting.pop(future)[0], future) for future in late]

    def episodes(self) -> list[Episode]:
        return [episode for episode, _ in self.waiting.values()]


_STAND_IN = [Message("user", "x")]  # the conversation an observation's tokens are rendered after


def _seed(base: int | None, prompt: int, sample: int) -> int | None:
    """Each episode samples with a seed of its own (its turns add their number to it): n requests of one
    seed would sample the same tokens."""
    return None if base is None else (base * 1_000_003 + prompt * 1_009 + sample * 101) % 2**31
