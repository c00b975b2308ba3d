"""The PPO learner: trainable policy, critic and frozen reference, on CUDA when present.

One iteration is `learn(records)`, in three timed stages:
    prepared = learner.evaluate(records)          # values: old logprobs, reference logprobs, values
    learner.assign_advantages(prepared, scores)   # advantages: KL-penalised token rewards, GAE
    stats = learner.update(prepared)              # update: ppo_epochs x minibatches
then `export_weights()` goes to the rollout workers as version `learner.version`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learner.advantages import gae, masked_mean, masked_whiten, token_rewards
from learner.batch import TokenBatch, collate, unpad_rows
from learner.kl_control import make_kl_controller
from learner.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from learner.models import Critic, ValueHead, load_policy, policy_logits
from rollout.config import JobConfig
from rollout.engine import resolve_device
from rollout.record import RolloutRecord


@dataclass
class PreparedBatch:
    tokens: TokenBatch
    old_logprobs: torch.Tensor      # (B, T) policy logprobs of the sampled tokens before the update
    ref_logprobs: torch.Tensor      # (B, T)
    values: torch.Tensor            # (B, T)
    token_rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class Learner:
    def __init__(self, cfg: JobConfig, model_path: str):
        self.cfg = cfg
        lc = cfg.learner
        self.device = torch.device(resolve_device(lc.device))
        if self.device.type == "cpu":
            # Generation and learning take turns, so the learner may use every core while it runs.
            torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(cfg.seed)
        self.policy = load_policy(model_path, cfg.model.dtype, self.device).train()
        self.reference = load_policy(model_path, cfg.model.dtype, self.device).eval().requires_grad_(False)
        self.pad_id = self.policy.config.pad_token_id or 0
        # Logprobs of the distribution the engine sampled from; greedy decoding is scored at T = 1.
        self.temperature = cfg.rollout.sampling.temperature or 1.0
        policy_params = list(self.policy.parameters())
        if lc.shared_critic:
            self.value_head = ValueHead(self.policy.config.hidden_size).to(self.device)
            self.critic = None
            policy_params += list(self.value_head.parameters())
            self.critic_opt = None
        else:
            self.value_head = None
            self.critic = Critic(model_path, cfg.model.dtype).to(self.device).train()
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=lc.critic_lr)
        self.policy_opt = torch.optim.AdamW(policy_params, lr=lc.lr)
        self.kl_controller = make_kl_controller(lc.kl.coef, lc.kl.target, lc.kl.horizon)
        self.version = 0

    def learn(self, records: list[RolloutRecord]) -> tuple[list[RolloutRecord], dict[str, float], dict[str, float]]:
        """One PPO iteration on scored records: (records with learner columns, stats, stage seconds)."""
        timings = {}
        start = time.perf_counter()
        prepared = self.evaluate(records)
        timings["values"] = time.perf_counter() - start
        start = time.perf_counter()
        self.assign_advantages(prepared, torch.tensor([r.reward for r in records], dtype=torch.float32))
        timings["advantages"] = time.perf_counter() - start
        start = time.perf_counter()
        stats = self.update(prepared)
        timings["update"] = time.perf_counter() - start
        self.fill_records(records, prepared)
        return records, stats, timings

    # -- scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, records: list[RolloutRecord]) -> PreparedBatch:
        """Old policy logprobs, reference logprobs and critic values for every response token."""
        tokens = collate(records, self.pad_id).to(self.device)
        logits, hidden = policy_logits(self.policy, tokens)
        old = logprobs_from_logits(logits, tokens.responses, self.temperature)
        ref_logits, _ = policy_logits(self.reference, tokens)
        ref = logprobs_from_logits(ref_logits, tokens.responses, self.temperature)
        values = self._values(tokens, hidden)
        m = tokens.mask
        return PreparedBatch(tokens, old * m, ref * m, values * m)

    def assign_advantages(self, batch: PreparedBatch, scores: torch.Tensor) -> None:
        lc = self.cfg.learner
        m = batch.tokens.mask
        batch.token_rewards, batch.kl = token_rewards(
            scores.to(self.device, torch.float32), batch.old_logprobs, batch.ref_logprobs, m,
            self.kl_controller.coef, lc.kl.estimator)
        batch.advantages, batch.returns = gae(batch.token_rewards, batch.values, m, lc.gamma, lc.lam)

    # -- learning --------------------------------------------------------------------------------

    def update(self, batch: PreparedBatch) -> dict[str, float]:
        lc = self.cfg.learner
        m = batch.tokens.mask
        advantages = masked_whiten(batch.advantages, m) if lc.whiten_advantages else batch.advantages
        B = m.shape[0]
        totals: dict[str, list[float]] = {}
        for _ in range(lc.ppo_epochs):
            order = torch.randperm(B)
            for start in range(0, B, lc.minibatch_size):
                idx = order[start:start + lc.minibatch_size].to(self.device)
                stats = self._step(batch, advantages, idx)
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v)
        seq_kl = (batch.kl * m).sum(dim=1).mean().item()
        self.kl_controller.update(seq_kl, B)
        self.version += 1
        out = {k: float(np.mean(v)) for k, v in totals.items()}
        out.update(kl=seq_kl, kl_coef=self.kl_controller.coef)
        return out

    def _step(self, batch: PreparedBatch, advantages: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
        lc = self.cfg.learner
        tokens = batch.tokens.select(idx)
        m = tokens.mask
        logits, hidden = policy_logits(self.policy, tokens)
        logprobs = logprobs_from_logits(logits, tokens.responses, self.temperature)
        pg_loss, pg_stats = policy_loss(logprobs, batch.old_logprobs[idx], advantages[idx], m,
                                        lc.clip_eps, lc.loss_agg)
        entropy = masked_mean(entropy_from_logits(logits), m)
        values = self._values(tokens, hidden)
        vf_loss, vf_stats = value_loss(values, batch.values[idx], batch.returns[idx], m, lc.value_clip)
        loss = pg_loss - lc.entropy_coef * entropy
        if self.critic is None:
            loss = loss + lc.vf_coef * vf_loss
        self.policy_opt.zero_grad(set_to_none=True)
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)
            vf_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), lc.max_grad_norm)
            self.critic_opt.step()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for group in self.policy_opt.param_groups for p in group["params"]], lc.max_grad_norm)
        self.policy_opt.step()
        return {
            "policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": entropy.item(),
            "clip_frac": pg_stats["clip_frac"].item(), "approx_kl": pg_stats["approx_kl"].item(),
            "value_clip_frac": vf_stats["value_clip_frac"].item(), "grad_norm": float(grad_norm),
        }

    def _values(self, tokens: TokenBatch, policy_hidden: torch.Tensor) -> torch.Tensor:
        if self.critic is None:
            return self.value_head(policy_hidden)
        return self.critic(tokens)

    # -- records, weights, checkpoints -----------------------------------------------------------

    @staticmethod
    def fill_records(records: list[RolloutRecord], batch: PreparedBatch) -> None:
        """Write the learner's per-token columns into the records, exactly as it used them."""
        m = batch.tokens.mask
        columns = {
            "ref_logprobs": unpad_rows(batch.ref_logprobs, m),
            "values": unpad_rows(batch.values, m),
            "token_rewards": unpad_rows(batch.token_rewards, m),
            "advantages": unpad_rows(batch.advantages, m),
            "returns": unpad_rows(batch.returns, m),
        }
        for i, record in enumerate(records):
            for name, rows in columns.items():
                setattr(record, name, rows[i])

    def version_number(self) -> int:
        return self.version

    def export_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Policy weights with Hugging Face names, on CPU, for the rollout workers."""
        return [(k, v.detach().to("cpu").contiguous()) for k, v in self.policy.state_dict().items()]

    # GPU clusters only: NCCL broadcast to the workers (rollout.weight_sync). Rank 0 is the learner.

    def weight_group_address(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def open_weight_group(self, host: str, port: int, world_size: int) -> None:
        from rollout.weight_sync import NcclWeightSender

        self._sender = NcclWeightSender(host, port, world_size, self.device)

    def weight_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        from rollout.weight_sync import NcclWeightSender

        return NcclWeightSender.specs(list(self.policy.state_dict().items()))

    def broadcast_weights(self) -> None:
        self._sender.send(list(self.policy.state_dict().items()))

    def save(self, directory: Path, extra: dict) -> None:
        """Policy as a loadable model directory, plus everything needed to resume."""
        directory.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(directory / "policy", safe_serialization=True)
        torch.save({
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "value_head": self.value_head.state_dict() if self.value_head is not None else None,
            "policy_opt": self.policy_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict() if self.critic_opt is not None else None,
            "kl_controller": self.kl_controller.state_dict(),
            "version": self.version,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "extra": extra,
        }, directory / "learner.pt")

    def load(self, directory: Path) -> dict:
        """Restore from `save`; returns its `extra` (job state such as the data cursor)."""
        from safetensors.torch import load_file

        self.policy.load_state_dict(load_file(str(directory / "policy" / "model.safetensors")), strict=False)
        state = torch.load(directory / "learner.pt", map_location=self.device, weights_only=False)
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.version = state["version"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        return state["extra"]
