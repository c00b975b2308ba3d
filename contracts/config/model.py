"""`model` (what the job starts from) and `data` (where its prompts come from)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
            "Prompt source: a JSONL/JSON file (SFT, XTuner or chat records), a Parquet or Arrow IPC file, a "
            "directory or glob of them, a directory written by `datasets`' `save_to_disk`, `hf:NAME[:SPLIT]` "
            "(`datasets.load_dataset`), `reasoning_gym:TASK[,TASK...]` (the `tasks` extra), or `builtin:arith`, "
            "generated `a+b=` problems with reference answers (`builtin:calc`: harder ones for the calculator)."
        ),
    ] = "builtin:arith"
    format: Annotated[
        Literal["auto", "sft", "xtuner", "chat", "verl"],
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
    source_params: Annotated[
        dict[str, Any],
        doc(
            "Settings of the data source that `prompts` names, for sources that take any: `reasoning_gym:` "
            "(`size`, `seed`, `tasks`), `hf:` (`name`, the dataset's configuration; `revision`)."
        ),
    ] = {}
    prompt_key: Annotated[
        str | None,
        doc(
            "The column holding the prompt, for a layout none of the known ones fits: a text column (one user "
            "turn) or a column of chat messages. Null: detect the layout per row."
        ),
    ] = None
    reference_key: Annotated[
        str | None,
        doc(
            "With `prompt_key`: the column holding the reference answer, a dotted path into nested columns "
            "(`reward_model.ground_truth`). Null: no reference."
        ),
    ] = None
    metadata_keys: Annotated[
        list[str] | None,
        doc(
            "With `prompt_key`: the columns kept as the record's metadata (what rules with a `metadata` "
            "parameter read). Null: every column other than the prompt and reference."
        ),
    ] = None
