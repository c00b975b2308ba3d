"""LoRA (`learner.lora.rank`): low-rank adapters on a frozen base, built with peft, and what the rest of
the learner needs from them.

- `Adapters(network, cfg, task_type)` injects peft's LoRA layers into `network` in place (its names and
  class stay; each target `x_proj` becomes `x_proj.base_layer` plus `x_proj.lora_A/B.default`) and
  freezes everything else in it: only the adapters train (and whatever trainable modules the caller
  keeps outside `network`, such as a value head). The adapted layers stay peft's, with a forward of
  fewer operators (one addmm for the adapter's term and the sum).
- `Adapters.off()`: the same modules with the adapters skipped, i.e. the base model. It is the policy's
  reference: no second copy of the weights, and the pass runs as the policy's does (autocast or FSDP's
  mixed precision in the compute dtype).
- `no_dropout(module)`: the no-grad passes (old logprobs, reference, probe) score the model the
  engines serve, which has no dropout.
- `merged_weights(policy, exports)`: the policy's weights as engines and `policy/` take them, each
  adapted layer's W + B·A·alpha/r computed per tensor into new memory (the training weights are never
  touched), under plain Hugging Face names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from contracts.config.base import ConfigError
from contracts.config.learner import LoraConfig

ADAPTER = "default"  # peft's name for the one adapter of each layer


class Adapters:
    """peft LoRA adapters on `network` (modified in place); `task_type` is peft's ("CAUSAL_LM" for the
    policy's LM, "FEATURE_EXTRACTION" for a critic's backbone)."""

    def __init__(self, network: nn.Module, cfg: LoraConfig, task_type: str):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        settings = PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            bias="none",  # a trained bias would make "adapters off" differ from the base model
            task_type=task_type,
        )
        try:
            # Kept for peft's own methods (tests merge a copy of it with `merge_and_unload`).
            self.peft_model = get_peft_model(network, settings)
        except ValueError as e:
            raise ConfigError(f"learner.lora.target_modules: {e}") from None
        self.layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self.layers:
            if type(layer) is LoraLinear:
                layer.__class__ = _fused_linear_class()
        for name, module in network.named_modules():
            if isinstance(module, BaseTunerLayer) and not isinstance(module, LoraLinear):
                raise ConfigError(
                    f"learner.lora.target_modules: {name} is a {type(module.get_base_layer()).__name__}; "
                    "only linear layers take adapters here"
                )
        output = network.get_output_embeddings() if hasattr(network, "get_output_embeddings") else None
        if isinstance(output, BaseTunerLayer):  # the policy reads the LM head's weight directly
            raise ConfigError(
                "learner.lora.target_modules: the LM head cannot take an adapter; target the blocks' layers"
            )

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The base model inside: every adapter skipped (peft's switch, per layer), back on after."""
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)


@functools.cache
def _fused_linear_class() -> type:
    """peft's LoRA linear layer with its forward in fewer operators (everything else, names and state
    included, is peft's)."""
    from peft.tuners.lora import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            """y = x·Wᵀ + bias + (x·Aᵀ)·(s·B)ᵀ: the scaling s folded into B (out x r) and the sum into one addmm,
            where peft multiplies and adds output-sized tensors (two more operators forward and two backward
            per layer, and their temporaries). Disabled or merged adapters, dropout in training and peft's
            call options go through peft's own forward."""
            dropout = self.lora_dropout[ADAPTER]
            if (
                self.disable_adapters
                or self.merged
                or args
                or kwargs
                or self.active_adapters != [ADAPTER]
                or (self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0)
            ):
                return super().forward(x, *args, **kwargs)
            base = self.base_layer(x)
            a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
            down = nn.functional.linear(x.to(a.dtype), a)  # (..., r)
            out = torch.addmm(
                base.reshape(-1, base.shape[-1]), down.reshape(-1, a.shape[0]), (b * self.scaling[ADAPTER]).t()
            )
            return out.view(base.shape)

    return FusedLoraLinear


@contextlib.contextmanager
def no_dropout(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode inside (LoRA's dropout off), back in training mode after."""
    module.eval()
    try:
        yield
    finally:
        module.train()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer steps: the adapters (and value heads) under LoRA, all of them without."""
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class Exports:
    """How the policy's state dict becomes Hugging Face weights: `rename` (base_layer keys to plain
    ones), `merge` (a base weight key -> its (lora_A key, lora_B key, scaling)), `skip` (adapter keys)."""

    rename: dict[str, str] = field(default_factory=dict)
    merge: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)


def exports(policy: nn.Module) -> Exports:
    """The `Exports` of `policy` (a PolicyModel whose `lm` holds adapters), from its module names, which
    sharding keeps."""
    from peft.tuners.lora import Linear as LoraLinear

    out = Exports()
    for name, module in policy.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        for key in module.state_dict():
            if key.startswith("base_layer."):
                out.rename[f"{name}.{key}"] = f"{name}.{key.removeprefix('base_layer.')}"
            else:
                out.skip.add(f"{name}.{key}")
        out.merge[f"{name}.base_layer.weight"] = (
            f"{name}.lora_A.{ADAPTER}.weight",
            f"{name}.lora_B.{ADAPTER}.weight",
            float(module.scaling[ADAPTER]),
        )
    return out


def weight_shapes(policy: nn.Module, plan: Exports | None) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every weight `named_weights` yields, in its order; nothing gathered."""
    plan = plan or Exports()
    return [
        (plan.rename.get(key, key).removeprefix("lm."), tuple(tensor.shape))
        for key, tensor in policy.state_dict().items()
        if key.startswith("lm.") and key not in plan.skip
    ]


@torch.no_grad()
def merged_weights(policy: nn.Module, plan: Exports | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The LM's weights with Hugging Face names, whole, each adapted weight merged (W + B·A·scaling, as
    peft's merge computes it) into a new tensor. A sharded tensor is gathered as it comes: a collective,
    so every rank iterates, in the same order."""
    plan = plan or Exports()
    state = policy.state_dict()
    for key, tensor in state.items():
        if not key.startswith("lm.") or key in plan.skip:
            continue
        whole = _whole(tensor)
        if key in plan.merge:
            a_key, b_key, scaling = plan.merge[key]
            whole = whole + (_whole(state[b_key]) @ _whole(state[a_key])) * scaling
        yield plan.rename.get(key, key).removeprefix("lm."), whole.detach()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def settings(cfg: LoraConfig) -> dict | None:
    """What a checkpoint records of the LoRA settings its adapters need (None: full fine-tuning)."""
    if cfg.rank is None:
        return None
    return {"rank": cfg.rank, "alpha": cfg.alpha, "target_modules": sorted(cfg.target_modules), "critic": cfg.critic}
