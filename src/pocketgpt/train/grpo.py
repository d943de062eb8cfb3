"""GRPO and RLOO: RL without a value model; a reply's advantage compares its reward with the rest of its group of
G = ``samples_per_prompt`` replies to one prompt, and pushes every token of the reply through PPO's clipped ratio::

    grpo:  A_i = (r_i − mean(r)) / (std(r) + eps)          rloo:  A_i = r_i − mean of the other G−1 rewards
    loss = mean_i mean_t [ −min(ρ_t·A_i, clip(ρ_t, 1±ε)·A_i) + β·KL_t ],   ρ_t = π(y_t) / π_old(y_t)
    KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1      (k3, to a frozen copy of --init; β = kl_coef, 0 = none)
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from .rl import OnlineStage, RLConfig, masked_mean
from .trainer import TrainConfig


class GRPOConfig(RLConfig):
    """The ``[grpo]`` section. ``[train] batch_size × grad_accum`` replies make one minibatch."""

    section: ClassVar[str] = "grpo"
    samples_per_prompt: int = Field(8, ge=2, description="replies sampled per prompt (the group)")
    kl_coef: float = Field(0.0, ge=0)
    advantage: Literal["grpo", "rloo"] = "grpo"
    adv_eps: float = Field(1e-4, gt=0)  # the eps in (r − mean) / (std + eps)


SECTIONS = {"grpo": GRPOConfig, "train": TrainConfig}  # the config of `pocketgpt grpo`


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """One advantage per reply from consecutive groups of ``group_size`` rewards (the module docstring)."""
    r = rewards.float().view(-1, group_size)
    if kind == "rloo":
        return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).view(-1)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, unbiased=False, keepdim=True) + eps)).view(-1)


def grpo_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2, ref_logp=None, kl_coef: float = 0.0):
    """The clipped objective (+ β·k3 KL) averaged over each reply's tokens, then over replies → (loss, metrics).
    ``logp``, ``old_logp``, ``ref_logp``, ``mask``: (B, T) per reply token; ``advantages``: (B,)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp((logp - old_logp) * m)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    metrics = {}
    if ref_logp is not None and kl_coef > 0:
        d = (ref_logp - logp) * m
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
        metrics["kl"] = float(masked_mean(kl.detach(), m))
    clipped = ((ratio - 1).abs() > clip_eps).to(m.dtype)
    return masked_mean(per_token, m, -1).mean(), {**metrics, "clip_ratio": float(masked_mean(clipped, m)),
                                                   "val/ratio": float(masked_mean(ratio.detach(), m))}


class GRPOStage(OnlineStage):
    name = "grpo"
    plot_keys = ["eval_accuracy", "eval_reward", "reward", "kl", "frac_reward_zero_std"]

    def advantages(self, buf: dict, raw: torch.Tensor, stopped: torch.Tensor) -> dict:
        G = self.cfg.samples_per_prompt
        buf["advantages"] = group_advantages(raw, G, self.cfg.advantage, self.cfg.adv_eps)
        std = raw.view(-1, G).std(-1, unbiased=False)
        return {"reward": float(raw.mean()), "reward_std": float(std.mean()),
                "frac_reward_zero_std": float((std == 0).float().mean())}

    def policy_loss(self, model, batch):
        logp, ent, _ = model(batch["idx"], batch["pos"], batch["targets"], batch["mask"])
        loss, metrics = grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], self.cfg.clip_range,
                                  batch["ref_logp"] if self.reference is not None else None, self.cfg.kl_coef)
        metrics["entropy"] = float(masked_mean(ent.detach(), batch["mask"]))
        return loss, metrics
