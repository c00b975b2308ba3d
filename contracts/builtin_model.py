"""Small causal LMs and their tokenizer, built on this machine with no download.

The tokenizer is a byte-level BPE trained on generated text (digits split one per token, so sums
are learnable), with bos/eos/pad and a chat template; the model is a Llama with random weights:
`builtin:tiny-llama` (~0.5M parameters, the embedded default) or `builtin:small-llama` (~21M, for
measuring the learner at a size where activations, not the interpreter, dominate),
`builtin:medium-llama` (~100M, for weight-sync and memory figures), and tiny builds
of the other families users bring (`builtin:tiny-qwen2`, `builtin:tiny-qwen3`,
`builtin:tiny-mistral`; a Llama spec names no family, so its cache key is unchanged). All are
saved with `save_pretrained` into one directory that transformers and
vLLM load. The build is cached under `cache_dir()` and keyed by its spec and chat template, so it happens once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"

SPEC = {
    "version": 1,
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
    "seed": 0,
}

# The families users bring, each as small as the tiny Llama, with what sets it apart: Qwen2 ties the
# LM head to the embeddings and has q/k/v biases, Qwen3 normalises q and k per head, Mistral uses
# grouped-query attention; all three with 2 key-value heads for 4 query heads.
BUILTINS = {
    "tiny-llama": SPEC,
    "small-llama": {
        **SPEC,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
    },
    "medium-llama": {
        **SPEC,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 14,
        "num_attention_heads": 12,
    },
    "tiny-qwen2": {**SPEC, "family": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": True},
    "tiny-qwen3": {**SPEC, "family": "qwen3", "num_key_value_heads": 2, "head_dim": 32},
    "tiny-mistral": {**SPEC, "family": "mistral", "num_key_value_heads": 2},
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Hermes tool calls' markers and JSON scaffolding, one token each (added after the byte-level BPE, as text
# that decodes as written): a call `<tool_call>{"name": "calc", "arguments": {"x": "2*3"}}</tool_call>` is
# 18 tokens instead of 63, near enough for the tiny model to copy the question's operands into it. The
# model's earlier rows keep their weights (the embeddings are grown after the random init), and text
# without these strings tokenizes as before.
TOOL_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    '{"name": "',
    '", "arguments": ',
    '{"',
    '": "',
    '"}}',
    '"}',
]

# Roles are marked by special tokens; an assistant turn ends with eos so generation stops there. Tools
# (OpenAI `tools`) are listed in a system line, `name(param,...)`, short enough for the tiny model's
# context; a tool call is written Hermes/Qwen style, `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
# (what the `hermes` tool-call parser reads back), and a tool's result is a user turn in `<tool_response>`.
# Messages with only role and content render as version 1's template did.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>tools:"
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    " {{ f['name'] }}({{ ((f['parameters'] or {})['properties'] or {}) | list | join(',') }})"
    "{% endfor %}{{ '\\n' }}{% endif %}"  # a newline right after a block tag is trimmed
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'tool' %}<|user|><tool_response>{{ message['content'] }}</tool_response>\n"
    "{% else %}<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}{% set f = call['function'] %}"
    '<tool_call>{"name": "{{ f[\'name\'] }}", "arguments": '
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    """Where built artefacts live: $ROLLOUT_CACHE, else ~/.cache/ppo-rollout."""
    return Path(os.environ.get("ROLLOUT_CACHE", Path.home() / ".cache" / "ppo-rollout"))


def resolve_model_path(path: str) -> str:
    """A config's `model.path` as a directory or hub id; a `builtin:NAME` model is built if missing."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise ValueError(
                f"model.path: unknown builtin model {name!r}; the builtins are "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
            )
        return str(build_builtin(name))
    return path


def load_tokenizer(path: str):
    """The tokenizer of a config's `model.path`: the one `AutoTokenizer` loads. A builtin model's is loaded by
    the class AutoTokenizer chose for it, recorded beside the build (with the transformers version that chose)
    the first time: AutoTokenizer's map of every model family costs 4-5 s of imports on 2 cores, which every
    job's driver spent at start-up to find that same class."""
    import transformers

    directory = resolve_model_path(path)
    if not path.startswith(BUILTIN_PREFIX):
        return transformers.AutoTokenizer.from_pretrained(directory)
    recorded = Path(directory) / "tokenizer_class"
    if recorded.exists():
        name, _, version = recorded.read_text().strip().partition(" ")
        chosen = getattr(transformers, name, None) if version == transformers.__version__ else None
        if chosen is not None:
            return chosen.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if getattr(transformers, type(tokenizer).__name__, None) is type(tokenizer):
        try:  # atomic: another process reads the whole line or none
            staging = recorded.with_name(f".tokenizer_class.{os.getpid()}")
            staging.write_text(f"{type(tokenizer).__name__} {transformers.__version__}\n")
            staging.replace(recorded)
        except OSError:  # a read-only cache: loaded through AutoTokenizer each time
            pass
    return tokenizer


def build_tiny_llama(root: Path | None = None) -> Path:
    return build_builtin("tiny-llama", root)


def build_builtin(name: str, root: Path | None = None) -> Path:
    """Build (once) and return the directory of a builtin model; safe to call from many processes."""
    spec = BUILTINS[name]
    # The template is saved with the tokenizer, so a changed template is a new build.
    key = hashlib.sha256((json.dumps(spec, sort_keys=True) + CHAT_TEMPLATE + json.dumps(TOOL_TOKENS)).encode())
    key = key.hexdigest()[:12]
    target = (root or cache_dir()) / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a one-off build; its per-shard bars only clutter command output
        tokenizer = _train_tokenizer()
        tokenizer.save_pretrained(staging)
        _random_model(tokenizer, spec).save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(target)  # atomic: a concurrent builder either wins or finds it built
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _corpus(rng: random.Random) -> list[str]:
    words = (
        "the a of to and is in that it for on with as was at by be this what sum answer "
        "number add plus equals question result compute please tell me how many total"
    ).split()
    lines = []
    for _ in range(4000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}")
        lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    return lines


def _train_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(random.Random(SPEC["seed"])), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in TOOL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = SPEC["max_position_embeddings"]
    return tokenizer


def _random_model(tokenizer, spec: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(spec["seed"])
    heads = spec["num_attention_heads"]
    extra = {"head_dim": spec["head_dim"]} if "head_dim" in spec else {}
    if spec.get("family", "llama") == "mistral":
        extra["sliding_window"] = None  # full attention at these lengths, as vLLM's CPU path expects
    config = AutoConfig.for_model(
        spec.get("family", "llama"),
        vocab_size=tokenizer.vocab_size,  # the BPE's: the tool tokens' rows are added below
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=spec.get("num_key_value_heads", heads),
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.get("tie_word_embeddings", False),
        torch_dtype="float32",
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


if __name__ == "__main__":
    import sys

    print(build_builtin(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
