"""`reward`: the rule functions, the reward model and a reward server that score a sample."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import field

from contracts.config.base import Base, doc


class RuleSpec(Base):
    name: Annotated[
        str,
        doc(
            "Rule function: a built-in (arithmetic, math, similarity, safety, format, length, overlong or "
            "reasoning_gym) or your own as package.module:function, called as function(prompt, response, "
            "reference, **params) -> float (declare a `metadata` parameter to get the record's metadata), "
            "importable on every node; it scores into the component named after the function."
        ),
    ]
    weight: Annotated[float, doc("Weight of this component in the total reward.")] = 1.0
    params: Annotated[dict[str, Any], doc("Keyword arguments of the rule.")] = field(default_factory=dict)


class RewardModelConfig(Base):
    path: Annotated[str, doc("Directory of a reward model trained by `reward train`.")]
    weight: Annotated[float, doc("Weight of the model score in the total reward.")] = 1.0
    batch_size: Annotated[int, doc("Samples scored per forward pass.", ge=1)] = 32
    num_gpus: Annotated[
        float,
        doc(
            "GPUs Ray reserves for each reward worker; with any, the reward model scores on its GPU (a 7B "
            "reward model on CPU is far too slow), with 0 on CPU.",
            ge=0,
        ),
    ] = 0.0


class RemoteRewardConfig(Base):
    url: Annotated[
        str,
        doc(
            "http(s) URL of a reward server of your own: batches of samples are POSTed to it as JSON and it "
            "answers one score each (the wire format is in docs/rewards.md, 'A reward server of your own'); scores into the component `remote`.",
            min_length=1,
        ),
    ]
    weight: Annotated[float, doc("Weight of the server's score in the total reward.")] = 1.0
    timeout_s: Annotated[
        float,
        doc(
            "Seconds a request waits for the server (to connect, for the answer, for its whole body) before it "
            "counts as failed and is retried.",
            gt=0,
        ),
    ] = 30.0
    max_retries: Annotated[
        int,
        doc(
            "Times a failed request (no connection, HTTP 5xx or 429, a time-out, a malformed answer) is sent again "
            "before the job fails; another HTTP 4xx is not retried.",
            ge=0,
        ),
    ] = 3
    backoff_s: Annotated[float, doc("Wait before the first retry, doubled before each one after it.", ge=0)] = 0.5
    max_in_flight: Annotated[int, doc("Requests one reward worker has open at once, at most.", ge=1)] = 4
    batch_size: Annotated[int, doc("Samples per request.", ge=1)] = 64


class RewardConfig(Base):
    rules: Annotated[
        list[RuleSpec],
        doc(
            "Rule functions and their weights, each {name, weight, params}: name is a built-in (see Registered) "
            "or your own package.module:function."
        ),
    ] = field(default_factory=lambda: [RuleSpec(name="arithmetic")])
    model: Annotated[RewardModelConfig | None, doc("Optional reward model.")] = None
    remote: Annotated[
        RemoteRewardConfig | None,
        doc(
            "Optional reward server of your own, over HTTP: {url, weight, timeout_s, max_retries, backoff_s, "
            "max_in_flight, batch_size}; docs/rewards.md ('A reward server of your own') has the wire format."
        ),
    ] = None
    num_workers: Annotated[int, doc("RewardWorker actors.", ge=1)] = 1
    max_restarts: Annotated[
        int,
        doc("Times Ray restarts a reward worker whose process died; the batch it was scoring is scored again.", ge=0),
    ] = 3
    num_cpus_per_worker: Annotated[
        float, doc("CPUs Ray reserves for each reward worker; rules are light, a reward model may want more.", gt=0)
    ] = 0.5
    timeout_s: Annotated[float, doc("A rule call slower than this marks that sample's component as failed.", gt=0)] = (
        5.0
    )
    stall_timeout_s: Annotated[
        float,
        doc(
            "A reward worker holding batches that scores nothing (or does not answer) for this long is killed "
            "and restarted as if it had died, and the batch it held is scored again.",
            gt=0,
        ),
    ] = 120.0
    failed_value: Annotated[float, doc("Value a failed component contributes to the total.")] = 0.0
    agent_weight: Annotated[
        float | None,
        doc(
            "Weight of component `agent`: the reward an `openai_agent` episode's agent function returned "
            "(docs/agents.md), added to the rules' weighted sum. null: 1.0 with env.name openai_agent, and no "
            "such component otherwise."
        ),
    ] = None
