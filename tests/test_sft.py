"""The SFT warm-up: labels on the completion only, and a few steps lower the loss."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from contracts.formats import parse_prompt
from learner.sft import sft_batch, sft_examples, train_sft


def test_sft_trains_on_completions_only_and_lowers_the_loss(tiny_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    records = [
        parse_prompt({"prompt": f"{a}+{b}=", "completion": str(a + b)}, "sft", f"t:{i}")
        for i, (a, b) in enumerate((a, b) for a in range(4) for b in range(4))
    ]
    examples = sft_examples(records, tokenizer, 64)
    batch = sft_batch(examples[:2], tokenizer.pad_token_id)
    prompt, completion = examples[0]
    assert (batch["labels"][0, : len(prompt)] == -100).all()
    assert batch["labels"][0, len(prompt) : len(prompt) + len(completion)].tolist() == completion
    assert completion[-1] == tokenizer.eos_token_id

    def loss(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(**sft_batch(examples, tokenizer.pad_token_id)).loss.item()

    out = train_sft(
        tiny_model_path,
        records,
        tmp_path / "sft",
        steps=30,
        lr=3e-3,
        batch_size=16,
        max_prompt_tokens=64,
        log=open("/dev/null", "w"),
    )
    assert loss(out) < 0.5 * loss(tiny_model_path)
