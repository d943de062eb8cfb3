"""RLHF with PPO: push the policy towards replies a reward scores higher, near its reference (TRL's recipe)::

    score per reply ─▶ ÷ running std, clip;  per-token reward r_t = −β·(log π_old(a_t) − log π_ref(a_t)) (+ the score
    on the last token);  value head V_t ─▶ GAE(γ, λ) ─▶ advantages A_t (whitened), returns R_t = A_t + V_t
    L = E[max(−A·ρ, −A·clip(ρ, 1±ε))] + c_v·E[max((V−R)², (V_clip−R)²)]/2 − c_e·H,   ρ = π(a_t) / π_old(a_t)
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..runtime import DTYPES
from .rl import OnlineStage, RLConfig, masked_mean, whiten
from .trainer import TrainConfig


class PPOConfig(RLConfig):
    """The ``[ppo]`` section. ``[train] batch_size × grad_accum`` replies make one minibatch."""

    section: ClassVar[str] = "ppo"
    epochs: int = Field(2, ge=1)  # PPO epochs over each rollout
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range_value: float = Field(0.2, ge=0)  # value clipping around the rollout's values
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    whiten_rewards: bool = True  # divide scores by their running std (a stable scale whatever the reward source)
    reward_clip: float = Field(10.0, ge=0)  # clip (whitened) scores to ±reward_clip (0 = off)
    missing_end_penalty: float = 0.0  # subtracted from the score of replies cut at max_new_tokens
    ref_dtype: Literal["fp32", "bf16"] = "fp32"  # precision of the frozen reference
    rm_dtype: Literal["fp32", "bf16"] = "fp32"  # precision of the frozen reward model


SECTIONS = {"ppo": PPOConfig, "train": TrainConfig}  # the config of `pocketgpt ppo`


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded rows → (advantages, returns), zero where masked."""
    m = F.pad(mask.float(), (0, 1))  # a zero column past the end: nothing follows a reply's last token
    v = F.pad(values, (0, 1))
    adv, last = torch.zeros_like(rewards), torch.zeros(len(rewards))
    for t in reversed(range(rewards.size(1))):
        last = rewards[:, t] + gamma * v[:, t + 1] * m[:, t + 1] - values[:, t] + gamma * lam * last * m[:, t + 1]
        adv[:, t] = last * m[:, t]
    return adv, (adv + values) * m[:, :-1]


def update_moments(moments: tuple, xs: list[float]) -> tuple:
    """Running ``(count, mean, M2)`` of the scores, for reward scaling (Chan et al.'s parallel update)."""
    count, mean, m2 = moments
    n, x_mean = len(xs), sum(xs) / len(xs)
    delta, total = x_mean - mean, count + n
    m2 += sum((x - x_mean) ** 2 for x in xs) + delta * delta * count * n / total
    return total, mean + delta * n / total, m2


class PPOStage(OnlineStage):
    name = "ppo"
    value_head = True
    plot_keys = ["eval_reward", "eval_accuracy", "objective/rlhf_reward", "objective/kl", "policy/clipfrac_avg"]

    moments = (0, 0.0, 0.0)  # of every score so far (update_moments)

    @staticmethod
    def dtypes(cfg: PPOConfig) -> tuple:
        return DTYPES[cfg.ref_dtype], DTYPES[cfg.rm_dtype]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "moments": list(self.moments)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.moments = tuple(state.get("moments", (0, 0.0, 0.0)))

    def advantages(self, buf: dict, raw: torch.Tensor, stopped: torch.Tensor) -> dict:
        cfg = self.cfg
        score = raw - cfg.missing_end_penalty * (~stopped).float()
        if cfg.whiten_rewards:
            every = score
            if self.trainer.world_size > 1:  # every rank keeps the same moments: scale with all ranks' scores
                every = torch.cat([torch.zeros_like(score) for _ in range(self.trainer.world_size)])
                torch.distributed.all_gather_into_tensor(every, score)
            self.moments = update_moments(self.moments, every.tolist())
            count, _, m2 = self.moments
            std = math.sqrt(m2 / count) if count > 1 else 1.0
            if std > 1e-6:  # (all scores so far equal: nothing to rescale)
                score = score / std
        if cfg.reward_clip > 0:
            score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
        mask = buf["mask"]
        kl = (buf["old_logp"] - buf["ref_logp"]) * mask  # per-token log-ratio on the sampled tokens
        non_score = -cfg.kl_coef * kl
        rewards = non_score.clone()
        rewards[torch.arange(len(score)), (mask.sum(1) - 1).clamp(min=0)] += score
        adv, buf["returns"] = gae(rewards, buf["values"], mask, cfg.gamma, cfg.lam)
        buf["advantages"] = whiten(adv, mask)
        return {"objective/kl": float(kl.sum(1).mean()), "objective/non_score_reward": float(non_score.sum(1).mean()),
                "objective/rlhf_reward": float((raw + non_score.sum(1)).mean()),
                "val/num_eos_tokens": float(stopped.sum())}

    def policy_loss(self, model, batch):
        cfg, mask = self.cfg, batch["mask"]
        logp, ent, values = model(batch["idx"], batch["pos"], batch["targets"], mask)
        adv = batch["advantages"]
        log_ratio = (logp - batch["old_logp"]) * mask
        ratio = torch.exp(log_ratio)
        pg_loss = masked_mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)),
                              mask)
        old_v, ret = batch["values"], batch["returns"]
        v_clip = old_v + (values - old_v).clamp(-cfg.clip_range_value, cfg.clip_range_value)
        vf_loss = 0.5 * masked_mean(torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2), mask)
        entropy = masked_mean(ent, mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
        with torch.no_grad():
            metrics = {"loss/policy_avg": pg_loss, "loss/value_avg": vf_loss, "policy/entropy_avg": entropy,
                       "policy/clipfrac_avg": masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), mask),
                       "policy/approxkl_avg": masked_mean(0.5 * log_ratio ** 2, mask),
                       "val/clipfrac_avg": masked_mean(((values - old_v).abs() > cfg.clip_range_value).float(), mask),
                       "val/ratio": masked_mean(ratio, mask)}
        return loss, {k: float(v) for k, v in metrics.items()}
