"""Per-GPU memory of the learner, estimated from a model config and the learner settings the code uses.

What one rank holds (P = policy parameters, R = learner.num_ranks, M = learner.micro_batch_tokens):
- policy: float32 master weights, gradients and two AdamW moments, sharded: 16·P / R bytes;
- critic (gae with a separate critic): the same for its backbone and value head;
- reference: compute-dtype weights, sharded, no optimizer: 2·P / R bytes (bfloat16);
- teacher (`learner.teacher`, Pt parameters): the same as the reference, of its own size: 2·Pt / R bytes;
- with LoRA (`learner.lora.rank` r, A adapter parameters: r·(in + out) for each target layer of each
  block): the policy's base frozen in float32 (4·P / R: no gradients, no optimizer state), the adapters
  16·A / R, no reference (the policy with its adapters off); a `lora` critic likewise; activations gain
  the adapters' r values per target per token and layer;
- gathered working set: FSDP2 unshards one transformer block at a time (plus one prefetched) and
  the root (embeddings, final norm, LM head) for the whole pass, in the compute dtype;
- activations of one micro-batch of M tokens, kept for backward: per token and layer about
  (10·h + 4·i) values in the compute dtype (attention by SDPA or, packed, varlen kernels: nothing
  grows with length²), or only the layer input (h values) with gradient checkpointing, plus one
  layer recomputed. M counts padding when micro-batches are padded and only real tokens when they
  are packed (`learner.pack_sequences`), so the same budget bounds both: packed micro-batches hold
  more samples, not more memory;
- LM head: one chunk of float32 logits (`LOGIT_CHUNK_BYTES`) about four times
  over in the backward pass (logits, probabilities, their gradient, a temporary);
- the iteration's per-token columns (old and reference logprobs, values, entropy, rewards,
  advantages, returns) for `samples` x `response_tokens`, float32, on every rank.
Framework overhead (CUDA context, allocator fragmentation, NCCL buffers) is not included: leave
10-20% headroom. `python -m learner.memory` prints the table in docs/cluster.md ("Learner memory per GPU").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from contracts.config.learner import LORA_TARGETS

GIB = 2**30
# One chunk's float32 logits in `learner.logprobs`: 220 tokens at a 152K vocabulary. Kept here so the
# estimate (and `rollout plan`, which reads it) imports no torch.
LOGIT_CHUNK_BYTES = 128 * 2**20
COLUMNS_KEPT = 8  # per-token float32 columns held for the whole iteration


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def block_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (self.heads * 2 + self.kv_heads * 2)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.root_params

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a block, by its Llama/Qwen/Mistral name."""
        h, i, head_dim = self.hidden, self.intermediate, self.hidden // self.heads
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def adapter_params(self, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
        """LoRA parameters of the whole model: r·(in + out) per target layer per block (names this
        shape does not know count 0)."""
        layers = self.projections()
        return self.layers * sum(rank * sum(layers[t]) for t in set(targets) if t in layers)


def estimate(
    shape: Shape,
    *,
    num_ranks: int,
    micro_batch_tokens: int,
    compute_bytes: int = 2,
    separate_critic: bool = True,
    gradient_checkpointing: bool = False,
    samples: int = 0,
    response_tokens: int = 0,
    lora_rank: int | None = None,
    lora_targets: Sequence[str] = LORA_TARGETS,
    lora_critic: bool = False,
    teacher_params: int = 0,
) -> dict[str, float]:
    """GiB per rank by part, and their total. `lora_rank` None: full fine-tuning; else LoRA of that rank
    on `lora_targets`, on the critic too with `lora_critic`; `teacher_params`: the teacher's (0: none)."""
    P = shape.params
    critic = P - shape.vocab * shape.hidden * (0 if shape.tied else 1)  # a backbone: no LM head of its own
    M, h, i = micro_batch_tokens, shape.hidden, shape.intermediate
    per_token_layer = h if gradient_checkpointing else 10 * h + 4 * i
    adapters = shape.adapter_params(lora_rank, lora_targets) if lora_rank else 0
    # Each adapter's A·x (r values per target), kept for backward by every network that has adapters.
    adapted = (1 + (separate_critic and lora_critic)) if lora_rank and not gradient_checkpointing else 0
    adapter_activations = adapted * M * shape.layers * (lora_rank or 0) * len(set(lora_targets)) * compute_bytes
    activations = M * shape.layers * per_token_layer * compute_bytes
    if gradient_checkpointing:
        activations += M * (10 * h + 4 * i) * compute_bytes  # the one layer being recomputed
    # Full fine-tuning: weights, gradients, two moments, float32 (16 bytes a parameter). LoRA: a frozen
    # float32 base (4 bytes) and the adapters' 16.
    policy_states = (4 * P + 16 * adapters) if lora_rank else 16 * P
    critic_states = (4 * critic + 16 * adapters) if lora_rank and lora_critic else 16 * critic
    parts = {
        "policy_states": policy_states / num_ranks,
        "critic_states": critic_states / num_ranks if separate_critic else 0.0,
        "reference": 0.0 if lora_rank else compute_bytes * P / num_ranks,
        "teacher": compute_bytes * teacher_params / num_ranks,
        "gathered_weights": compute_bytes * (2 * shape.block_params + shape.root_params) * (1 if num_ranks > 1 else 0),
        "activations": activations * (2 if separate_critic else 1) + adapter_activations,
        "lm_head_chunk": 4 * LOGIT_CHUNK_BYTES,
        "batch_columns": 4 * COLUMNS_KEPT * samples * response_tokens,
    }
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


QWEN25_05B = Shape(hidden=896, layers=24, intermediate=4864, vocab=151936, heads=14, kv_heads=2, tied=True)
QWEN25_7B = Shape(hidden=3584, layers=28, intermediate=18944, vocab=152064, heads=28, kv_heads=4, tied=False)


def table(samples: int = 20000, response_tokens: int = 512) -> str:
    rows = [
        "| model | params | ranks | micro_batch_tokens | grad. ckpt | states (policy+critic+ref) | "
        "activations | total GiB per GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in (("Qwen2.5-0.5B", QWEN25_05B), ("Qwen2.5-7B", QWEN25_7B)):
        for ranks in (1, 2, 4, 8):
            for budget, checkpointing in ((4096, False), (8192, False), (16384, True)):
                e = estimate(
                    shape,
                    num_ranks=ranks,
                    micro_batch_tokens=budget,
                    gradient_checkpointing=checkpointing,
                    samples=samples,
                    response_tokens=response_tokens,
                )
                states = e["policy_states"] + e["critic_states"] + e["reference"]
                rows.append(
                    f"| {name} | {shape.params / 1e9:.2f}B | {ranks} | {budget} | "
                    f"{'yes' if checkpointing else 'no'} | {states:.1f} | {e['activations']:.1f} | "
                    f"{e['total']:.1f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
