"""`model` (what the job starts from) and `data` (where its prompts come from)."""

from __future__ import annotations

from typing import Annotated, Literal

from contracts.config.base import Base, doc


class ModelConfig(Base):
    path: Annotated[
        str,
        doc(
            "Policy model: a local directory, a Hugging Face id (where the hub is reachable), or "
            "`builtin:tiny-llama`, a ~0.5M-parameter Llama built on this machine and cached "
            "(`builtin:small-llama`: the same at ~21M parameters)."
        ),
    ] = "builtin:tiny-llama"
    sft_warmup: Annotated[
        bool,
        doc(
            "Warm the policy with SFT on the prompt file's reference completions before PPO "
            "(cached by data and settings), so PPO starts from a policy that is sometimes right."
        ),
    ] = False
    sft_steps: Annotated[int, doc("Optimizer steps of the SFT warm-up.", ge=1)] = 300
    sft_lr: Annotated[float, doc("Learning rate of the SFT warm-up.", gt=0)] = 3e-3
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"],
        doc(
            "Compute dtype: the engines' weights and the learner's forward and backward passes. The "
            "learner keeps float32 master weights and optimizer state whatever this is, and the frozen "
            "reference model in this dtype. float32 on CPU."
        ),
    ] = "float32"
    max_prompt_tokens: Annotated[
        int, doc("Longest rendered prompt, in tokens; longer records are reported as bad.", ge=1)
    ] = 1024


class DataConfig(Base):
    prompts: Annotated[
        str,
        doc(
            "Prompt file (SFT JSONL, XTuner JSON/JSONL or chat JSONL), or `builtin:arith`, "
            "generated `a+b=` problems with reference answers."
        ),
    ] = "builtin:arith"
    format: Annotated[
        Literal["auto", "sft", "xtuner", "chat"],
        doc("Prompt file format; `auto` detects it per record, so a file may mix formats."),
    ] = "auto"
    on_bad_record: Annotated[
        Literal["stop", "skip"],
        doc(
            "What a bad record does: `stop` the run (after reporting every bad record), or `skip` it "
            "(reported and counted)."
        ),
    ] = "stop"
    builtin_size: Annotated[int, doc("Number of records `builtin:arith` generates.", ge=1)] = 2000
    builtin_max_operand: Annotated[int, doc("Largest operand of `builtin:arith` problems.", ge=1)] = 9
    shuffle: Annotated[bool, doc("Shuffle prompts each pass over the data.")] = True
