"""RLHF with PPO: sample replies, score them, and push the policy towards higher reward, near its reference.

One PPO iteration (``PPOStage.get_batch`` rolls out a new batch every ``steps_per_rollout`` optimizer steps and serves
minibatches from its buffer otherwise; the one ``Trainer`` does the optimisation)::

    prompts ─▶ rollout (engine.generate, sampled, per-token log-probs) ─▶ replies
    replies ─▶ reward model (or a Python reward function) ─▶ score per reply ─▶ running whitening (÷ std)
    policy / frozen reference log-probs ─▶ per-token reward  r_t = -β·(log π(a_t) - log π_ref(a_t))  (+ score at the end)
    value head ─▶ V_t ;  GAE(γ, λ) ─▶ advantages A_t (whitened), returns R_t = A_t + V_t
    ppo_epochs × minibatches:  L = E[max(-A·ρ, -A·clip(ρ, 1±ε))] + c_v·E[max((V-R)², (V_clip-R)²)]/2 - c_e·H
                               with ρ = π(a_t) / π_old(a_t)

Model layout (memory on a CPU): the value head is a ``Linear(n_embd, 1)`` on the **policy's own backbone** (one
transformer serves policy and value, as in TRL's value-head models; the value loss is scaled by ``vf_coef``), so
the trainable model is the policy plus ``n_embd + 1`` numbers. The reference is a frozen copy of the starting policy
(no grad, eval; ``ref_dtype = "bf16"`` halves it), and the reward model is loaded frozen (eval, no grad,
``rm_dtype``); neither has optimizer state. The checkpoint ``RUN/ckpt`` is a plain GPT checkpoint of the policy
(chat / export load it) plus ``value_head.safetensors`` for resuming. Nothing else can be shared correctly: the
reference must stay the *starting* policy, and the reward model is a different network.

Peak memory (``peak_rss_mb`` in the metrics; measured with ``--config ppo-tiny`` on the 2-core CPU, one thread;
the Python + torch + pocketgpt imports alone are 276 MB):

    policy 0.45M params (benchmarks/rlhf.py's model) + RM of the same size          451 MB
    policy 11.1M params (6 layers, 384 wide, context 256) + RM of the same size     991 MB (ref/RM in bf16: 995 MB)

so a run needs roughly the imports + 16 bytes per trainable parameter (weights, gradients, two AdamW moments) +
4 bytes per frozen parameter (reference, reward model) + activations of one minibatch; bf16 frozen copies only pay
off for models much larger than these.

Rewards: ``--reward RM_CKPT`` (a ``pocketgpt rm`` checkpoint; replies are re-rendered with the RM's own tokenizer and
chat template) or ``--reward-fn module:function`` / ``path/file.py:function`` called as ``fn(prompt_messages,
reply_text) -> number``. A function that raises or returns a non-number stops the run: the message names the prompt
record and the step, and a checkpoint of the last completed step is written so the same command resumes.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .rl_common import (RewardFunctionError, Rollout, call_reward_fn, frozen_copy, freeze, load_reward_fn,
                        masked_mean, pack_prompt_reply, read_prompts_with_lines, reply_logprobs, reply_targets,
                        resolve_file, rollout, whiten)

VALUE_HEAD_FILE = "value_head.safetensors"


# ---- configuration -----------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """PPO options (TOML section ``[ppo]``). ``[train] batch_size × grad_accum`` rows make one minibatch."""

    rollout_prompts: int = 16  # prompts per rollout batch
    samples_per_prompt: int = 1  # replies sampled per prompt
    ppo_epochs: int = 2  # passes over each rollout batch
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    kl_coef: float = 0.05  # β of the per-token KL penalty against the reference
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2  # ε of the clipped policy ratio
    clip_range_value: float = 0.2  # value clipping around the rollout's values
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    whiten_rewards: bool = True  # divide scores by their running std (stable scale across reward sources)
    reward_clip: float = 10.0  # clip (whitened) scores to ±reward_clip (0 = off)
    missing_end_penalty: float = 0.0  # subtracted from the score of replies cut at max_new_tokens
    eval_prompts: int = 16  # prompts held out from --prompts for evaluation (when no --eval-prompts)
    eval_temperature: float = -1.0  # < 0: same as temperature (same sampling settings as the rollouts)
    eval_seed: int = 1234
    ref_dtype: str = "fp32"  # fp32 | bf16: precision of the frozen reference
    rm_dtype: str = "fp32"  # fp32 | bf16: precision of the frozen reward model
    score_batch_size: int = 16  # rows per no-grad forward (reference, values, reward model)
    seed: int = 0

    def validate(self, where: str = "[ppo]") -> "PPOConfig":
        def bad(field: str, msg: str) -> UserError:
            return UserError(f"{where}: field '{field}' {msg}")

        for name in ("rollout_prompts", "samples_per_prompt", "ppo_epochs", "max_new_tokens", "score_batch_size"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.eval_prompts < 0 or self.top_k < 0:
            raise bad("eval_prompts", "and top_k must be >= 0")
        if self.temperature <= 0:
            raise bad("temperature", "must be > 0 for PPO rollouts (sampling)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.ent_coef < 0 or self.reward_clip < 0:
            raise bad("kl_coef", "vf_coef, ent_coef and reward_clip must be >= 0")
        if not 0 < self.clip_range < 1 or self.clip_range_value <= 0:
            raise bad("clip_range", "must be in (0, 1) and clip_range_value > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise bad("gamma", "and lam must be in [0, 1]")
        for name in ("ref_dtype", "rm_dtype"):
            if getattr(self, name) not in ("fp32", "bf16"):
                raise bad(name, f"must be fp32 or bf16, got {getattr(self, name)!r}")
        return self

    @property
    def rollout_rows(self) -> int:
        return self.rollout_prompts * self.samples_per_prompt


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- policy + value head -----------------------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The policy GPT and a scalar value head on its final hidden states (shared backbone)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx, pos, targets, mask):
        """Per-token log-probs, entropies and values of the reply positions ``pos`` → three (B, T) tensors."""
        logp, ent, h = reply_logprobs(self.policy, idx, pos, targets, mask, return_entropy=True, return_hidden=True)
        values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logp, ent, values

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        return self.policy.flops_per_token(seq_len)


def save_policy(model: PolicyWithValue, directory: Path) -> None:
    """The policy as a plain GPT checkpoint + ``value_head.safetensors``."""
    from safetensors.torch import save_file

    model.policy.write_files(directory)
    vh = {k: v.detach().float().contiguous().cpu() for k, v in model.value_head.state_dict().items()}
    save_file(vh, str(Path(directory) / VALUE_HEAD_FILE), metadata={"format": "pt"})


def load_policy(model: PolicyWithValue, directory: Path) -> None:
    from safetensors.torch import load_file

    from .trainer import default_load_model

    default_load_model(model.policy, directory)
    path = Path(directory) / VALUE_HEAD_FILE
    if path.is_file():
        sd = load_file(str(path))
        with torch.no_grad():
            for k, v in model.value_head.state_dict().items():
                v.copy_(sd[k])


# ---- reward sources ----------------------------------------------------------------------------------------------------


class Scorer:
    """Scores (prompt messages, reply text) pairs with a reward model or a Python function."""

    def __init__(self, *, reward_ckpt: Optional[str | Path] = None, reward_fn: Optional[Callable] = None,
                 device=None, dtype: torch.dtype = torch.float32, batch_size: int = 16):
        self.fn = reward_fn
        self.rm = None
        self.batch_size = batch_size
        self.description = getattr(reward_fn, "__name__", "reward function")
        if reward_ckpt is not None:
            from ..chat import find_checkpoint
            from ..tokenizer import load_tokenizer_for
            from .reward import load_reward_model

            path = find_checkpoint(reward_ckpt)
            self.rm = freeze(load_reward_model(path, device=device, dtype=dtype))
            self.rm_tokenizer = load_tokenizer_for(path)
            self.description = str(path)
        if (self.rm is None) == (self.fn is None):
            raise UserError("ppo: give exactly one of --reward RM_CKPT and --reward-fn module:function")

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], replies: list[str], records: list[str]) -> list[float]:
        if self.fn is not None:
            return [call_reward_fn(self.fn, p, r, record=rec) for p, r, rec in zip(prompts, replies, records)]
        from .reward import encode_reply

        block = self.rm.config.block_size
        rows = [encode_reply(p, r, self.rm_tokenizer, block) for p, r in zip(prompts, replies)]
        return self.rm.score_ids(rows, self.rm_tokenizer.pad_id, self.batch_size)


# ---- GAE -----------------------------------------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded rows → (advantages, returns), zero where masked."""
    B, T = rewards.shape
    m = mask.float()
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros(B)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last * (m[:, t + 1] if t + 1 < T else 0.0)
        adv[:, t] = last * m[:, t]
    return adv, (adv + values) * m


class RunningMoments:
    """Running mean / variance (Chan et al. parallel update), for reward whitening; JSON-able state."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: list[float]) -> None:
        if not xs:
            return
        n = len(xs)
        mean = sum(xs) / n
        m2 = sum((x - mean) ** 2 for x in xs)
        delta = mean - self.mean
        tot = self.count + n
        self.mean += delta * n / tot
        self.m2 += m2 + delta * delta * self.count * n / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.m2 = int(d.get("count", 0)), float(d.get("mean", 0.0)), float(d.get("m2", 0.0))


# ---- the stage -----------------------------------------------------------------------------------------------------------


class PPOStage:
    """Rollouts + PPO minibatches for the one Trainer; ``evaluate`` samples held-out prompts and scores them."""

    name = "ppo"
    plot_keys = ["reward", "kl", "eval_reward", "entropy", "clip_frac"]
    best_metric = "eval_reward"
    best_mode = "max"

    def __init__(self, cfg: PPOConfig, tokenizer, prompts: list[list[dict]], prompt_records: list[str],
                 scorer: Scorer, reference: nn.Module, *, eval_prompts: list[list[dict]] = (),
                 eval_records: list[str] = (), batch_size: int = 8, grad_accum: int = 1):
        self.cfg = cfg.validate()
        self.tokenizer = tokenizer
        self.prompts, self.records = prompts, prompt_records
        self.eval_prompts, self.eval_records = list(eval_prompts), list(eval_records)
        self.scorer = scorer
        self.reference = reference
        self.batch_size, self.grad_accum = batch_size, grad_accum
        rows = cfg.rollout_rows
        per_step = batch_size * grad_accum
        if rows % per_step:
            raise UserError(f"[ppo] rollout_prompts × samples_per_prompt = {rows} rows must be a multiple of "
                            f"[train] batch_size × grad_accum = {per_step} (one minibatch per optimizer step)")
        self.minibatches = rows // per_step
        self.steps_per_rollout = cfg.ppo_epochs * self.minibatches
        self.moments = RunningMoments()
        self.rollouts_done = 0
        self.buffer: Optional[dict] = None
        self.buffer_start = -1
        self.stats: dict[str, float] = {}
        self.model: Optional[PolicyWithValue] = None
        self.device = torch.device("cpu")

    # -- Trainer hooks ----------------------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        from .trainer import world_info

        _, world, _ = world_info()
        if world > 1:
            raise UserError("ppo: multi-process (torchrun) training is not supported; run one process")
        self.model = trainer.model
        self.device = trainer.device
        self.reference.to(self.device)
        if self.scorer.rm is not None:
            self.scorer.rm.to(self.device)
        self.grad_accum = trainer.cfg.grad_accum
        self.batch_size = trainer.cfg.batch_size

    def state_dict(self) -> dict:
        # the buffer itself is not saved: a resumed run rolls out a fresh batch at its first step
        return {"moments": self.moments.state_dict(), "rollouts_done": self.rollouts_done, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state.get("moments", {}))
        self.rollouts_done = int(state.get("rollouts_done", 0))
        self.stats = dict(state.get("stats", {}))
        self.buffer = None

    def tokens_in_batch(self, batch) -> int:
        return int(batch["mask"].sum())

    # -- rollouts ---------------------------------------------------------------------------------------------------
    def _sample_prompts(self, k: int) -> list[int]:
        rng = random.Random(self.cfg.seed * 1_000_003 + self.rollouts_done)
        n = len(self.prompts)
        if k <= n:
            return rng.sample(range(n), k)
        return [rng.randrange(n) for _ in range(k)]

    def _score(self, rolls: list[Rollout], prompts, records, step: Optional[int]) -> list[float]:
        try:
            return self.scorer(prompts, [r.text for r in rolls], records)
        except RewardFunctionError as e:
            where = f"step {step}" if step is not None else "evaluation"
            raise RewardFunctionError(f"{e} ({where})") from None

    @torch.no_grad()
    def make_rollout(self, step: int) -> None:
        cfg = self.cfg
        policy = self.model.policy
        chosen = self._sample_prompts(cfg.rollout_prompts)
        prompts = [self.prompts[i] for i in chosen]
        rolls = rollout(policy, self.tokenizer, prompts, n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k or None,
                        top_p=cfg.top_p if cfg.top_p < 1 else None,
                        seed=cfg.seed * 7919 + self.rollouts_done, recompute_logprobs=False)
        row_prompts = [prompts[r.prompt_index] for r in rolls]
        row_records = [self.records[chosen[r.prompt_index]] for r in rolls]
        scores = self._score(rolls, row_prompts, row_records, step + 1)  # before any state changes

        idx, pos, mask = pack_prompt_reply([r.prompt_ids for r in rolls], [r.reply_ids for r in rolls],
                                           pad_id=self.tokenizer.pad_id)
        targets = reply_targets([r.reply_ids for r in rolls], pos.size(1))
        old_logp, values, ref_logp, ent = [], [], [], []
        self.model.eval()
        bs = cfg.score_batch_size
        for i in range(0, len(rolls), bs):
            sl = slice(i, i + bs)
            args = [t[sl].to(self.device) for t in (idx, pos, targets, mask)]
            lp, e, v = self.model(*args)
            rl, _, _ = reply_logprobs(self.reference, *args)
            old_logp.append(lp.cpu())
            ent.append(e.cpu())
            values.append(v.cpu())
            ref_logp.append(rl.float().cpu())
        self.model.train()
        old_logp, values, ref_logp, ent = (torch.cat(x) for x in (old_logp, values, ref_logp, ent))
        m = mask.float()
        values = values * m

        raw = torch.tensor(scores, dtype=torch.float32)
        stopped = torch.tensor([r.finish_reason == "stop" for r in rolls])
        score = raw - cfg.missing_end_penalty * (~stopped).float()
        if cfg.whiten_rewards:
            self.moments.update(score.tolist())
            std = self.moments.std
            if std > 1e-6:  # (all scores so far equal: nothing to rescale)
                score = score / std
        if cfg.reward_clip > 0:
            score = score.clamp(-cfg.reward_clip, cfg.reward_clip)

        kl = (old_logp - ref_logp) * m  # per-token log-ratio on the sampled tokens
        rewards = -cfg.kl_coef * kl
        lengths = mask.sum(1)
        last = (lengths - 1).clamp(min=0)
        rewards[torch.arange(len(rolls)), last] += score
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask)

        self.buffer = {"idx": idx, "pos": pos, "targets": targets, "mask": mask, "old_logp": old_logp,
                       "old_values": values, "advantages": adv, "returns": returns}
        g = torch.Generator().manual_seed(cfg.seed * 31 + self.rollouts_done)
        self.perms = [torch.randperm(len(rolls), generator=g) for _ in range(cfg.ppo_epochs)]
        self.buffer_start = step
        self.rollouts_done += 1
        self.stats = {
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if len(rolls) > 1 else 0.0,
            "kl": float(kl.sum(1).mean()),
            "rollout_entropy": float(masked_mean(ent, mask)),
            "reply_len": float(lengths.float().mean()),
            "stop_frac": float(stopped.float().mean()),
            "peak_rss_mb": peak_rss_mb(),
        }

    def get_batch(self, step: int, micro: int):
        if self.buffer is None or step - self.buffer_start >= self.steps_per_rollout or step < self.buffer_start:
            self.make_rollout(step)
        local = step - self.buffer_start
        epoch, j = divmod(local, self.minibatches)
        start = (j * self.grad_accum + micro) * self.batch_size
        rows = self.perms[epoch][start: start + self.batch_size]
        batch = {k: v[rows] for k, v in self.buffer.items()}
        # trim padding columns this minibatch does not need
        T = max(1, int(batch["mask"].sum(1).max()))
        L = max(1, int((batch["pos"][:, :T].max(1).values + 2).max()))
        for k in ("pos", "targets", "mask", "old_logp", "old_values", "advantages", "returns"):
            batch[k] = batch[k][:, :T]
        batch["idx"] = batch["idx"][:, :L]
        return batch

    # -- the loss ---------------------------------------------------------------------------------------------------
    def loss(self, model, batch):
        cfg = self.cfg
        mask = batch["mask"]
        logp, ent, values = model(batch["idx"], batch["pos"], batch["targets"], mask)
        adv, old_logp = batch["advantages"], batch["old_logp"]
        log_ratio = (logp - old_logp) * mask
        ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
        pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
        old_v, ret = batch["old_values"], batch["returns"]
        v_clip = old_v + (values - old_v).clamp(-cfg.clip_range_value, cfg.clip_range_value)
        vf_loss = 0.5 * masked_mean(torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2), mask)
        entropy = masked_mean(ent, mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
        with torch.no_grad():
            clip_frac = masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), mask)
            approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
        metrics = {"pg_loss": float(pg_loss.detach()), "vf_loss": float(vf_loss.detach()),
                   "entropy": float(entropy.detach()), "clip_frac": float(clip_frac), "approx_kl": float(approx_kl)}
        metrics.update(self.stats)
        return loss, metrics

    # -- evaluation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        res = evaluate_policy(model.policy, self.tokenizer, self.eval_prompts, self.eval_records, self.scorer,
                              self.cfg, reference=self.reference)
        return {"eval_reward": res["reward"], "eval_kl": res["kl"], "eval_reply_len": res["reply_len"]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1024 * 1024) if sys.platform == "darwin" else r / 1024, 1)


@torch.no_grad()
def evaluate_policy(policy: nn.Module, tokenizer, prompts: list[list[dict]], records: list[str], scorer: Scorer,
                    cfg: PPOConfig, *, reference: Optional[nn.Module] = None, seed: Optional[int] = None,
                    temperature: Optional[float] = None) -> dict:
    """Sample one reply per prompt (fixed seed; the rollouts' sampling settings unless overridden) and score it.

    Returns ``{"reward", "kl" (vs ``reference``, summed over reply tokens, mean over replies), "reply_len",
    "scores", "texts"}``.
    """
    was = policy.training
    policy.eval()
    temp = temperature if temperature is not None else (cfg.eval_temperature if cfg.eval_temperature >= 0
                                                          else cfg.temperature)
    dev_type = next(policy.parameters()).device.type
    with torch.autocast(dev_type, enabled=False):  # the same precision as the rollouts (outside autocast)
        rolls = rollout(policy, tokenizer, prompts, n=1, max_new_tokens=cfg.max_new_tokens, temperature=temp,
                        top_k=(cfg.top_k or None) if temp > 0 else None,
                        top_p=(cfg.top_p if cfg.top_p < 1 else None) if temp > 0 else None,
                        seed=cfg.eval_seed if seed is None else seed, recompute_logprobs=True)
        scores = scorer([prompts[r.prompt_index] for r in rolls], [r.text for r in rolls],
                        [records[r.prompt_index] for r in rolls])
        kl = float("nan")
        if reference is not None:
            from .rl_common import sequence_logprobs_batch

            kls = []
            for i in range(0, len(rolls), cfg.score_batch_size):
                chunk = rolls[i: i + cfg.score_batch_size]
                ref_lp, mask = sequence_logprobs_batch(reference, [r.prompt_ids for r in chunk],
                                                       [r.reply_ids for r in chunk])
                for r, row in zip(chunk, ref_lp.float().tolist()):
                    kls.append(sum(a - b for a, b in zip(r.logprobs, row[: len(r.reply_ids)])))
            kl = sum(kls) / max(1, len(kls))
    policy.train(was)
    return {"reward": sum(scores) / max(1, len(scores)), "kl": kl,
            "reply_len": sum(len(r.reply_ids) for r in rolls) / max(1, len(rolls)),
            "scores": scores, "texts": [r.text for r in rolls]}


# ---- the run ---------------------------------------------------------------------------------------------------------------


def split_prompts(prompts, lines, n_eval: int, seed: int = 0):
    """Hold out ``n_eval`` prompts (a fixed shuffle); keep at least one for training."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_eval = min(n_eval, len(prompts) - 1)
    ev, tr = order[:n_eval], order[n_eval:]
    return [prompts[i] for i in tr], [lines[i] for i in tr], [prompts[i] for i in ev], [lines[i] for i in ev]


def train_ppo(policy_ckpt: str | Path, prompts_path: str | Path, out: str | Path, run_config, *,
              reward_ckpt: Optional[str | Path] = None, reward_fn: Optional[str | Callable] = None,
              eval_prompts_path: Optional[str | Path] = None, resume: Optional[bool] = None) -> dict:
    """Run PPO from an SFT checkpoint; returns the Trainer's final metrics (+ ``peak_rss_mb``)."""
    from ..chat import find_checkpoint
    from ..model import GPT
    from ..runtime import pick_device
    from ..tokenizer import load_tokenizer_for
    from .trainer import Trainer

    tcfg, cfg = run_config["train"], run_config["ppo"].validate()
    if (reward_ckpt is None) == (reward_fn is None):
        raise UserError("ppo: give exactly one of --reward RM_CKPT and --reward-fn module:function")
    fn = load_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn
    policy_ckpt = find_checkpoint(policy_ckpt)
    tokenizer = load_tokenizer_for(policy_ckpt)
    policy = GPT.from_pretrained(policy_ckpt)
    if tokenizer.vocab_size > policy.config.vocab_size:
        raise UserError(f"{policy_ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{policy.config.vocab_size}")
    ppath = resolve_file(prompts_path)
    prompts, lines = read_prompts_with_lines(ppath)
    records = [f"{ppath}:{ln}" for ln in lines]
    if eval_prompts_path is not None:
        epath = resolve_file(eval_prompts_path)
        ev_prompts, ev_lines = read_prompts_with_lines(epath)
        ev_records = [f"{epath}:{ln}" for ln in ev_lines]
        tr_prompts, tr_records = prompts, records
    else:
        tr_prompts, tr_records, ev_prompts, ev_records = split_prompts(prompts, records, cfg.eval_prompts, cfg.seed)

    device = pick_device(tcfg.device)
    reference = frozen_copy(policy, dtype=_DTYPES[cfg.ref_dtype])  # the starting policy, frozen
    scorer = Scorer(reward_ckpt=reward_ckpt, reward_fn=fn, device=device, dtype=_DTYPES[cfg.rm_dtype],
                    batch_size=cfg.score_batch_size)
    stage = PPOStage(cfg, tokenizer, tr_prompts, tr_records, scorer, reference, eval_prompts=ev_prompts,
                     eval_records=ev_records, batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum)
    model = PolicyWithValue(policy)
    trainer = Trainer(model, stage, tcfg, out, tokenizer=tokenizer, save_model=save_policy, load_model=load_policy,
                      run_config=run_config.to_dict(), resume=resume)
    print(f"ppo: {len(tr_prompts)} training prompts, {len(ev_prompts)} held out; reward: {scorer.description}; "
          f"{stage.steps_per_rollout} optimizer steps per rollout of {cfg.rollout_rows} replies", file=sys.stderr)
    try:
        result = trainer.fit()
    except RewardFunctionError as e:
        # stop cleanly: the weights are those after the last completed optimizer step — save them so the same
        # command resumes once the function is fixed
        trainer.save_checkpoint()
        raise RewardFunctionError(f"{e}; stopped; checkpoint of step {trainer.step} saved in {trainer.ckpt_dir}")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ---- CLI -----------------------------------------------------------------------------------------------------------------


def _sections() -> dict:
    from .trainer import TrainConfig

    return {"train": TrainConfig, "ppo": PPOConfig}


def configure_cli(name: str, parser: argparse.ArgumentParser) -> None:
    from ..config import add_config_arguments, add_resume_arguments

    parser.add_argument("--policy", required=True, metavar="CKPT", help="the SFT checkpoint to start from")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--reward", metavar="RM_CKPT", help="a reward model trained with pocketgpt rm")
    src.add_argument("--reward-fn", metavar="MODULE:FUNCTION",
                     help="a Python reward fn(prompt_messages, reply_text) -> number (module or path/file.py)")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="prompts JSONL: {\"messages\": [...]} / {\"prompt\": [...] or \"text\"} per line")
    parser.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts (default: [ppo] eval_prompts of "
                                                                "--prompts are held out)")
    parser.add_argument("--out", metavar="DIR", default="runs/ppo", help="run directory (default runs/ppo)")
    add_resume_arguments(parser)
    add_config_arguments(parser, _sections(), default_config="ppo-tiny")
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    from ..config import config_from_args, resume_from_args

    run_config = config_from_args(args, _sections())
    resume = resume_from_args(args)
    result = train_ppo(args.policy, args.prompts, args.out, run_config, reward_ckpt=args.reward,
                       reward_fn=args.reward_fn, eval_prompts_path=args.eval_prompts, resume=resume)
    parts = [f"policy saved in {Path(args.out) / 'ckpt'}"]
    for key in ("reward", "kl", "eval_reward", "eval_kl"):
        if isinstance(result.get(key), (int, float)):
            parts.append(f"{key} {result[key]:.4f}")
    parts.append(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    print("; ".join(parts))
    return 0
