"""Direct preference optimisation (DPO): learn from preference pairs without a reward model or rollouts::

    h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]      (π_ref: the frozen --init model)
    sigmoid loss (DPO):  −(1−ε)·log σ(β·h) − ε·log σ(−β·h)     (ε = label smoothing, "conservative DPO")
    IPO loss:            (h − 1/(2β))²   with per-token *mean* log-probs (Azar et al., 2023)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from .. import runtime
from ..config import Config, FieldError, StrList
from ..engine import pack_replies, token_logprobs
from ..errors import UserError
from ..io import atomic_write_bytes
from ..lora import WithoutAdapters, adapted, apply as apply_lora
from ..records import read_pairs, split
from .reward import encode_replies
from .rl import frozen_copy
from .pretrain import context_size
from .sft import _stderr_on_rank0, epoch_batches, load_init
from .trainer import Trainer, TrainConfig, world_info

REF_CACHE = "ref_logprobs.safetensors"


class DPOConfig(Config):
    section: ClassVar[str] = "dpo"
    init: str = Field("", description="SFT checkpoint to start from (also the frozen reference model)")
    data: StrList = Field([], description="preference pairs JSONL ({\"prompt\": [messages], \"chosen\": str, "
                                          "\"rejected\": str}) or the bundled name 'prefs'")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid (DPO) or ipo")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: probability that a label is "
                                                                  "wrong (sigmoid loss only)")
    reference: Literal["precomputed", "online"] = Field(
        "precomputed", description="reference log-probs computed once up front (cached) or every step (frozen copy)")
    block_size: int = Field(0, ge=0)  # 0 = the model's context
    val_fraction: float = Field(0.1, gt=0, lt=1)  # held-out pairs (they give the accuracy / margins)
    val_max: int = Field(200, ge=0)
    max_pairs: int = Field(0, ge=0)  # 0 = all; else a seeded sample of this many

    @model_validator(mode="after")
    def _smoothing_is_sigmoid_only(self) -> "DPOConfig":
        if self.label_smoothing and self.loss != "sigmoid":
            raise FieldError("label_smoothing", "applies to the sigmoid loss only")
        return self


SECTIONS = {"dpo": DPOConfig, "train": TrainConfig}  # the config of `pocketgpt dpo`


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards β·(log π − log π_ref) (detached) from sequence log-probs, all (B,)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def pair_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen reply has the higher implicit reward; exact ties count half."""
    d = chosen_rewards - rejected_rewards
    return ((d > 0).float() + 0.5 * (d == 0).float()).mean()


def sequence_scores(model: nn.Module, pairs: list[tuple]) -> torch.Tensor:
    """(B, 4) float32 log-probs of ``(prompt, chosen, rejected)`` id triples, in one forward: the chosen and the
    rejected reply's sums, then their per-token means."""
    prompts = [p for p, _, _ in pairs] * 2
    replies = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    idx, pos, targets, mask = pack_replies(prompts, replies, device=next(model.parameters()).device)
    logp, _, _ = token_logprobs(model, idx, pos, targets, mask)
    total = (logp.float() * mask).sum(-1)  # chosen rows, then rejected ones
    mean = total / mask.sum(-1).clamp(min=1)
    B = len(pairs)
    return torch.stack([total[:B], total[B:], mean[:B], mean[B:]], -1)


class DPOStage:
    """Batches of preference pairs; the DPO / IPO loss against a frozen reference (the init model)."""

    name = "dpo"
    plot_keys = ["rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
    best_metric = "val_loss"

    def __init__(self, model: nn.Module, train: list[tuple], val: list[tuple], opts: DPOConfig, batch_size: int,
                 seed: int = 1337, fingerprint: str = ""):
        if not train:
            raise UserError("dpo: no training pairs")
        self.model, self.train, self.val, self.opts = model, train, val, opts
        self.batch_size, self.seed = batch_size, seed
        self.fingerprint = fingerprint  # init + every pair: a run directory resumes on the same data only
        self.columns = slice(2, 4) if opts.loss == "ipo" else slice(0, 2)  # of sequence_scores: IPO's means, or sums
        self.ref: Optional[nn.Module] = None  # the online reference; else precomputed reference scores:
        self.ref_scores: dict[str, torch.Tensor] = {}  # "train" / "val" → sequence_scores of every pair
        self._initial_eval_done = False
        if opts.reference == "online":
            self.ref = WithoutAdapters(model) if adapted(model) else frozen_copy(model)  # LoRA: no second copy

    def setup(self, trainer) -> None:
        self.trainer, self.grad_accum = trainer, trainer.cfg.grad_accum
        if self.ref is not None:
            self.ref.to(trainer.device)
        else:
            self.ref_scores = self._reference_scores(trainer)

    @torch.no_grad()
    def _score_all(self, pairs: list[tuple], trainer, desc: str) -> torch.Tensor:
        chunks = [pairs[i: i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
        quiet = not sys.stderr.isatty() or bool(os.environ.get("CI"))
        self.model.eval()  # (Trainer.fit sets training mode again)
        with runtime.autocast(trainer.device, trainer.dtype):
            out = [sequence_scores(self.model, c).cpu()
                   for c in tqdm(chunks, desc=desc, disable=quiet, file=sys.stderr, leave=False)]
        return torch.cat(out) if out else torch.zeros(0, 4)

    def _reference_scores(self, trainer) -> dict[str, torch.Tensor]:
        """The reference scores of every pair: from ``RUN/ref_logprobs.safetensors`` when it was made for this data
        and precision, else computed now with the (still untrained) model and cached there."""
        path = Path(trainer.run_dir) / REF_CACHE
        key = f"{self.fingerprint}|{trainer.dtype}"
        with contextlib.suppress(Exception), safe_open(str(path), "pt") as f:  # a missing or bad cache: recompute
            if (f.metadata() or {}).get("key") == key:
                return {k: f.get_tensor(k) for k in ("train", "val")}
        scores = {"train": self._score_all(self.train, trainer, "dpo reference (train)"),
                  "val": self._score_all(self.val, trainer, "dpo reference (held-out)")}
        if trainer.is_main:
            atomic_write_bytes(path, save(scores, metadata={"key": key}))
        return scores

    def get_batch(self, step: int, micro: int):
        if step == 0 and micro == 0 and not self._initial_eval_done:
            self._initial_eval_done = True  # the step-0 point of the held-out curves
            self.trainer.evaluate()
        rank, world, _ = world_info()
        n = len(self.train)
        # full batches only (fewer pairs than a batch: they repeat); batches follow from the step alone
        epoch, pos = divmod((step * self.grad_accum + micro) * world + rank, max(1, n // self.batch_size))
        batch = epoch_batches(n, self.batch_size, self.seed, epoch)[pos]
        return {"index": torch.tensor([batch[j % len(batch)] for j in range(self.batch_size)])}

    def tokens_in_batch(self, batch) -> int:
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in (self.train[i] for i in batch["index"].tolist()))

    def _scores(self, model, split: str, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) chosen and rejected scores of the policy and of the reference, as the loss wants them."""
        pairs = [(self.train if split == "train" else self.val)[i] for i in index]
        policy = sequence_scores(model, pairs)[:, self.columns]
        if self.ref is None:
            return policy, self.ref_scores[split][index][:, self.columns].to(policy.device)
        with torch.no_grad():
            return policy, sequence_scores(self.ref, pairs)[:, self.columns]

    def _metrics(self, policy: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        losses, rew_c, rew_r = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.opts.beta,
                                        self.opts.loss, self.opts.label_smoothing)
        logps = policy.detach()
        return losses.mean(), {
            "rewards/chosen": float(rew_c.mean()), "rewards/rejected": float(rew_r.mean()),
            "rewards/accuracies": float(pair_accuracy(rew_c, rew_r)), "rewards/margins": float((rew_c - rew_r).mean()),
            "logps/chosen": float(logps[:, 0].mean()), "logps/rejected": float(logps[:, 1].mean())}

    def loss(self, model, batch):
        return self._metrics(*self._scores(model, "train", batch["index"].tolist()))

    def evaluate(self, model) -> dict[str, float]:
        if not self.val:
            return {}
        n, size = len(self.val), self.batch_size
        scores = [self._scores(model, "val", list(range(i, min(i + size, n)))) for i in range(0, n, size)]
        loss, metrics = self._metrics(*(torch.cat(s) for s in zip(*scores)))
        return {"val_loss": float(loss), **{f"eval_{k}": v for k, v in metrics.items()}}

    def state_dict(self) -> dict:  # batches are a pure function of (seed, step); the fingerprint pins the pairs
        return {}

    def load_state_dict(self, state: dict) -> None:
        self._initial_eval_done = True  # a resumed run already has its step-0 evaluation


def run_dpo(opts: DPOConfig, out: str | Path, train, *, run_config: Optional[dict] = None,
            resume: Optional[bool] = None, log=None) -> dict:
    """Train ``opts.init`` with DPO on ``opts.data`` through the Trainer; returns the final metrics."""
    log = log or _stderr_on_rank0
    if not opts.init:
        raise UserError("--init: required (the SFT checkpoint to improve; it is also the reference model)")
    model, tokenizer, _ = load_init(opts.init, log, "dpo")
    block = context_size(opts.block_size, model.config.block_size, "[dpo] block_size")
    pairs = read_pairs(opts.data)
    if opts.max_pairs and len(pairs) > opts.max_pairs:
        pairs = random.Random(train.seed).sample(pairs, opts.max_pairs)
    held_in, held_out = split(pairs, opts.val_fraction, train.seed, most=opts.val_max)
    train_pairs = [encode_replies(p.prompt, [p.chosen, p.rejected], tokenizer, block) for p in held_in]
    val_pairs = [encode_replies(p.prompt, [p.chosen, p.rejected], tokenizer, block) for p in held_out]
    data = str(Path(opts.init).resolve()) + "".join(repr(p) for p in train_pairs + val_pairs)
    log(f"dpo: {len(pairs)} pairs -> {len(train_pairs)} training / {len(val_pairs)} held-out; context {block}")
    apply_lora(model, train, log)
    stage = DPOStage(model, train_pairs, val_pairs, opts, train.batch_size, seed=train.seed,
                     fingerprint=hashlib.sha256(data.encode()).hexdigest())
    log(f"dpo: {model.num_params() / 1e6:.2f}M parameters, beta {opts.beta}, loss {opts.loss}"
        + (f" (label smoothing {opts.label_smoothing})" if opts.label_smoothing else "")
        + f", reference {opts.reference} -> {out}")
    run_config = run_config or {"dpo": opts.to_dict(), "train": train.to_dict()}
    with Trainer(model, stage, train, out, tokenizer=tokenizer, run_config=run_config, resume=resume) as trainer:
        return trainer.fit()
