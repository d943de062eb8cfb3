"""Direct preference optimisation (DPO): learn from preference pairs without a reward model or rollouts.

    pairs ──chat template──▶ (prompt ids, chosen reply ids, rejected reply ids)
    π = policy (trained), π_ref = the init model (frozen)
    h      = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]
    sigmoid loss (DPO):      −(1−ε)·log σ(β·h) − ε·log σ(−β·h)            (ε = label smoothing, "conservative DPO")
    IPO loss:                (h − 1/(2β))²   with per-token *mean* log-probs (Azar et al., 2023)

Pairs are JSONL ``{"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}`` (the reward
model's format; ``--data prefs`` is the bundled HH-RLHF sample). Each reply is rendered with the one chat template —
the prompt, ``<|assistant|>``, the reply, ``<|end|>`` — and only the reply tokens (with their ``<|end|>``) count.
Over-long pairs keep their replies (cut to fit when they alone are too long) and lose the oldest prompt tokens.

The reference log-probs are computed once, before training, with the init model in the training precision and
cached in ``RUN/ref_logprobs.safetensors`` (``reference = "precomputed"``, the default; a resumed run reuses the
cache), or on the fly from a frozen copy (``reference = "online"``: no up-front pass, one extra forward per step;
with LoRA the copy is the same weights with the adapters off).

Metrics, named as TRL's DPOTrainer logs them: per step ``loss``, ``rewards/chosen`` and ``rewards/rejected`` (mean
implicit rewards β·(log π − log π_ref)), ``rewards/accuracies`` (fraction of pairs whose chosen reply has the higher
implicit reward; ties count half), ``rewards/margins`` (chosen − rejected) and ``logps/chosen`` / ``logps/rejected``
(the policy's log-probs of the replies: sums, or per-token means for IPO); on the held-out pairs at every evaluation
(and once at step 0) ``val_loss`` and the same with an ``eval_`` prefix (``eval_rewards/accuracies``, ...). Plots:
``RUN/rewards_accuracies.png``, ``RUN/rewards_margins.png``, ``RUN/logps_chosen.png``, ``RUN/logps_rejected.png``
(train curve and held-out points).
Batches are a pure function of (seed, step), so a killed run resumes exactly (``pocketgpt dpo`` again).

CLI::

    pocketgpt dpo --init SFT_CKPT --data PAIRS --beta 0.1 [--loss sigmoid|ipo] [--label-smoothing 0.1]
                  [--reference precomputed|online] [--config dpo-tiny] [--out runs/dpo] [--key value ...]
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydantic import Field, model_validator

from ..config import Config, FieldError, StrList
from ..chat import render, stop_id
from ..errors import UserError
from .trainer import TrainConfig
from ..records import fit, read_pairs, split

REF_CACHE = "ref_logprobs.safetensors"


class DPOConfig(Config):
    """The ``[dpo]`` section of a config."""

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


# --------------------------------------------------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards from sequence log-probs (all shape (B,)).

    Returns ``(losses, chosen_rewards, rejected_rewards)``; rewards are β·(log π − log π_ref), detached.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen reply has the higher implicit reward; exact ties count half."""
    d = chosen_rewards - rejected_rewards
    return ((d > 0).float() + 0.5 * (d == 0).float()).mean()


# --------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class EncodedPair:
    prompt: list[int]  # ends in <|assistant|>
    chosen: list[int]  # reply tokens + <|end|> (unless cut)
    rejected: list[int]
    where: str


def encode_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer, block_size: int,
                where: str = "") -> EncodedPair:
    """Token ids of one pair as the chat template writes them, cut into ``block_size`` tokens by ``records.fit``:
    replies longer than half the context (when the prompt needs the rest) lose their end, the prompt its oldest
    tokens (never its ``<|assistant|>``)."""
    end = stop_id(tokenizer)
    return EncodedPair(*fit(render(prompt, tokenizer, add_generation_prompt=True)[0], block_size,
                            tokenizer.encode(chosen) + [end], tokenizer.encode(rejected) + [end]), where)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield list(range(i, min(n, i + size)))


def sequence_scores(model: nn.Module, pairs: list[EncodedPair], index: list[int]) -> tuple[torch.Tensor, ...]:
    """Sum and per-token mean log-probs of the chosen and rejected replies of ``pairs[index]`` in one forward.

    Returns ``(chosen_sum, rejected_sum, chosen_mean, rejected_mean)``, each (B,) float32 (with grad if enabled)."""
    from ..engine import pack_replies, token_logprobs

    chunk = [pairs[i] for i in index]
    prompts = [p.prompt for p in chunk] * 2
    replies = [p.chosen for p in chunk] + [p.rejected for p in chunk]
    device = next(model.parameters()).device
    idx, pos, targets, mask = pack_replies(prompts, replies, device=device)
    logp, _, _ = token_logprobs(model, idx, pos, targets, mask)
    total = (logp.float() * mask).sum(-1)
    mean = total / mask.sum(-1).clamp(min=1)
    B = len(chunk)
    return total[:B], total[B:], mean[:B], mean[B:]


# --------------------------------------------------------------------------------------------------------------------
# the stage


class DPOStage:
    """Batches of preference pairs; the DPO / IPO loss against a frozen reference (the init model)."""

    name = "dpo"
    plot_keys = ["rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
    best_metric = "val_loss"

    def __init__(self, model: nn.Module, train: list[EncodedPair], val: list[EncodedPair], opts: DPOConfig,
                 batch_size: int, seed: int = 1337, cache_key: str = ""):
        if not train:
            raise UserError("dpo: no training pairs")
        self.model = model
        self.train, self.val = train, val
        self.opts = opts
        self.batch_size = batch_size
        self.seed = seed
        self.cache_key = cache_key
        self.fingerprint = cache_key  # init + every pair: a run directory resumes on the same data only
        self.grad_accum = 1
        self.trainer = None
        self.ref: Optional[nn.Module] = None
        self.ref_train: Optional[torch.Tensor] = None  # (N, 2): chosen, rejected reference scores
        self.ref_val: Optional[torch.Tensor] = None
        self._initial_eval_done = False
        self._epoch_cache: tuple[int, list[int]] = (-1, [])
        if opts.reference == "online":
            from ..lora import WithoutAdapters, adapted
            from .rl import frozen_copy

            self.ref = WithoutAdapters(model) if adapted(model) else frozen_copy(model)  # LoRA: no second copy

    # ---- reference --------------------------------------------------------------------------------------------------

    @property
    def _use_mean(self) -> bool:
        return self.opts.loss == "ipo"

    def setup(self, trainer) -> None:
        self.trainer = trainer
        self.grad_accum = trainer.cfg.grad_accum
        if self.ref is not None:
            self.ref.to(trainer.device)
            return
        self.ref_train, self.ref_val = self._reference_scores(trainer)

    @torch.no_grad()
    def _score_all(self, model: nn.Module, pairs: list[EncodedPair], device, dtype, desc: str) -> torch.Tensor:
        from tqdm import tqdm

        from .. import runtime

        out = []
        bs = max(1, self.batch_size)
        was = model.training
        model.eval()
        chunks = list(_chunks(len(pairs), bs))
        try:
            with runtime.autocast(device, dtype):
                for index in tqdm(chunks, desc=desc, disable=not sys.stderr.isatty() or bool(_env("CI")),
                                  file=sys.stderr, leave=False):
                    cs, rs, cm, rm = sequence_scores(model, pairs, index)
                    out.append(torch.stack([cs, rs, cm, rm], -1).float().cpu())
        finally:
            model.train(was)
        return torch.cat(out) if out else torch.zeros(0, 4)

    def _reference_scores(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of every pair: from ``RUN/ref_logprobs.safetensors`` when it matches, else computed
        now with the (still untrained) model and cached there."""
        from safetensors.torch import load_file, save_file

        from ..io import atomic_write_bytes

        path = Path(trainer.run_dir) / REF_CACHE
        key = f"{self.cache_key}|{trainer.dtype}"
        if path.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                if meta.get("key") == key:
                    t = load_file(str(path))
                    if t["train"].shape[0] == len(self.train) and t["val"].shape[0] == len(self.val):
                        return t["train"], t["val"]
            except Exception:  # noqa: BLE001 - a bad cache is recomputed
                pass
        ref_train = self._score_all(self.model, self.train, trainer.device, trainer.dtype, "dpo reference (train)")
        ref_val = self._score_all(self.model, self.val, trainer.device, trainer.dtype, "dpo reference (held-out)")
        if trainer.is_main:
            import tempfile

            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=trainer.run_dir) as tmp:
                save_file({"train": ref_train.contiguous(), "val": ref_val.contiguous()}, f"{tmp}/r.safetensors",
                          metadata={"key": key})
                atomic_write_bytes(path, Path(f"{tmp}/r.safetensors").read_bytes())
        return ref_train, ref_val

    def _ref_for(self, index: list[int], split: str, model_device) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference chosen / rejected scores (sum or mean, as the loss wants) of ``index``."""
        if self.ref is not None:
            pairs = self.train if split == "train" else self.val
            with torch.no_grad():
                cs, rs, cm, rm = sequence_scores(self.ref, pairs, index)
            return (cm, rm) if self._use_mean else (cs, rs)
        table = self.ref_train if split == "train" else self.ref_val
        rows = table[index].to(model_device)
        return (rows[:, 2], rows[:, 3]) if self._use_mean else (rows[:, 0], rows[:, 1])

    # ---- batches ----------------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_cache[0] != epoch:
            order = list(range(len(self.train)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def get_batch(self, step: int, micro: int):
        from .trainer import world_info

        if step == 0 and micro == 0 and not self._initial_eval_done and self.trainer is not None:
            self._initial_eval_done = True  # the step-0 point of the held-out curves
            self.trainer.evaluate()
        rank, world, _ = world_info()
        k = (step * self.grad_accum + micro) * world + rank
        n = len(self.train)
        per_epoch = max(1, n // self.batch_size) if n >= self.batch_size else 1
        epoch, pos = divmod(k, per_epoch)
        order = self._order(epoch)
        index = [order[(pos * self.batch_size + j) % n] for j in range(self.batch_size)]
        return {"index": torch.tensor(index, dtype=torch.long)}

    def tokens_in_batch(self, batch) -> int:
        return sum(len(self.train[i].prompt) * 2 + len(self.train[i].chosen) + len(self.train[i].rejected)
                   for i in batch["index"].tolist())

    def _pair_metrics(self, model, index: list[int], split: str) -> tuple[torch.Tensor, dict[str, float]]:
        pairs = self.train if split == "train" else self.val
        device = next(model.parameters()).device
        cs, rs, cm, rm = sequence_scores(model, pairs, index)
        pc, pr = (cm, rm) if self._use_mean else (cs, rs)
        ref_c, ref_r = self._ref_for(index, split, device)
        losses, rew_c, rew_r = dpo_loss(pc, pr, ref_c, ref_r, self.opts.beta, self.opts.loss,
                                        self.opts.label_smoothing)
        metrics = {
            "rewards/chosen": float(rew_c.mean()),
            "rewards/rejected": float(rew_r.mean()),
            "rewards/accuracies": float(pair_accuracy(rew_c, rew_r)),
            "rewards/margins": float((rew_c - rew_r).mean()),
            "logps/chosen": float(pc.detach().mean()),
            "logps/rejected": float(pr.detach().mean()),
        }
        return losses.mean(), metrics

    def loss(self, model, batch):
        return self._pair_metrics(model, batch["index"].tolist(), "train")

    def evaluate(self, model) -> dict[str, float]:
        if not self.val:
            return {}
        sums: dict[str, float] = {}
        for index in _chunks(len(self.val), max(1, self.batch_size)):  # pair-weighted means over the chunks
            loss, m = self._pair_metrics(model, index, "val")
            for key, v in {"val_loss": float(loss), **{f"eval_{k}": v for k, v in m.items()}}.items():
                sums[key] = sums.get(key, 0.0) + v * len(index)
        return {k: v / len(self.val) for k, v in sums.items()}

    def state_dict(self) -> dict:  # batches are a pure function of (seed, step)
        return {"train_pairs": len(self.train), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._initial_eval_done = True  # a resumed run already has its step-0 evaluation
        n = state.get("train_pairs")
        if n is not None and n != len(self.train):
            print(f"warning: resuming with {len(self.train)} training pairs, the checkpoint had {n}: "
                  "batches will differ from an uninterrupted run", file=sys.stderr)


def _env(name: str) -> str:
    import os

    return os.environ.get(name, "")


# --------------------------------------------------------------------------------------------------------------------
# running


def prepare_dpo(opts: DPOConfig, seed: int, log=print):
    """Model, tokenizer and encoded ``(train, val)`` pairs for ``opts``; also a cache key of the data."""
    from .sft import load_init

    model, tokenizer, added = load_init(opts.init)
    if added:
        log(f"dpo: added chat tokens {' '.join(added)} to the tokenizer (was --init an SFT checkpoint?)")
    block = opts.block_size or model.config.block_size
    if block > model.config.block_size:
        raise UserError(f"[dpo] block_size: {block} is larger than the model's context of "
                        f"{model.config.block_size} tokens")
    pairs = read_pairs(opts.data)
    if opts.max_pairs and len(pairs) > opts.max_pairs:
        pairs = random.Random(seed).sample(pairs, opts.max_pairs)
    train_p, val_p = split(pairs, opts.val_fraction, seed, most=opts.val_max)
    enc = lambda ps: [encode_pair(p.prompt, p.chosen, p.rejected, tokenizer, block, p.where) for p in ps]
    train, val = enc(train_p), enc(val_p)
    h = hashlib.sha256()
    h.update(str(Path(opts.init).resolve()).encode())
    for p in train + val:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    log(f"dpo: {len(pairs)} pairs -> {len(train)} training / {len(val)} held-out; context {block}")
    return model, tokenizer, train, val, h.hexdigest()


def run_dpo(opts: DPOConfig, out: str | Path, train, *, run_config: Optional[dict] = None,
            resume: Optional[bool] = None, log=None) -> dict:
    """Train ``opts.init`` with DPO on ``opts.data`` through the Trainer; returns the final metrics."""
    from ..lora import apply as apply_lora
    from .sft import _stderr_on_rank0
    from .trainer import Trainer

    log = log or _stderr_on_rank0
    if not opts.init:
        raise UserError("--init: required (the SFT checkpoint to improve; it is also the reference model)")
    model, tokenizer, train_pairs, val_pairs, key = prepare_dpo(opts, train.seed, log)
    apply_lora(model, train, log)
    stage = DPOStage(model, train_pairs, val_pairs, opts, train.batch_size, seed=train.seed, cache_key=key)
    cfg = dict(run_config or {})
    cfg.update({"dpo": {**opts.to_dict(), "init": str(opts.init)}, "train": train.to_dict()})
    log(f"dpo: {model.num_params() / 1e6:.2f}M parameters, beta {opts.beta}, loss {opts.loss}"
        + (f" (label smoothing {opts.label_smoothing})" if opts.label_smoothing else "")
        + f", reference {opts.reference} -> {out}")
    trainer = Trainer(model, stage, train, out, tokenizer=tokenizer, run_config=cfg, resume=resume)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    return result
