"""Supervised fine-tuning: conversations rendered by ``chat.render`` (split at turn boundaries to fit the context),
loss on the assistant tokens only. Batches are right-padded, not packed (causal attention never lets a token see the
pads after it, so no mask is needed); each epoch is one seeded shuffle of every example, so batches mix every source
and are a pure function of (seed, step): resume is exact with no data state. The held-out split is by conversation.
"""

from __future__ import annotations

import functools
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch

from pydantic import Field

from ..chat import IGNORE, FitStats, fit_to_context
from ..checkpoint import load_model, local_dir
from ..config import Config, StrList
from ..errors import UserError
from ..lora import apply as apply_lora
from ..records import pad, read_conversations, split
from ..tokenizer import SPECIAL_TOKENS, load_tokenizer_for
from .pretrain import PretrainStage, bytes_per_token, context_size, mean_loss, val_metrics
from .trainer import Trainer, TrainConfig, world_info


class SFTConfig(Config):
    """The ``[sft]`` section of a config: what to train on and how to cut it."""

    section: ClassVar[str] = "sft"
    init: str = Field("", description="checkpoint to fine-tune: a pocketgpt checkpoint, a Hugging Face GPT-2 / "
                                      "Llama directory or hf:NAME (a Hub model)")
    data: StrList = Field([], description="conversation JSONL files ({\"messages\": [...]} per line, .jsonl or "
                                          ".jsonl.gz) or bundled corpus names")
    val_data: StrList = Field([], description="held-out conversation files (default: a val_fraction of --data)")
    block_size: int = Field(0, ge=0)  # training context; 0 = the model's
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held-out conversations (when val_data is empty)
    val_max: int = Field(200, ge=0)  # at most this many held-out conversations
    overflow: Literal["split", "truncate"] = "split"  # conversations longer than the context
    skip_bad: bool = False  # skip bad JSONL lines (with a count) instead of stopping
    max_conversations: int = Field(0, ge=0)  # 0 = all; else a seeded sample of this many (quick runs)


SECTIONS = {"sft": SFTConfig, "train": TrainConfig}  # the config of `pocketgpt sft`


def load_init(path: str | Path, log, section: str):
    """``(model, tokenizer, added_token_names)`` of ``--init``, given (and told) the chat tokens it lacks."""
    path = local_dir(path)
    model = load_model(path)
    tokenizer = load_tokenizer_for(path)
    added = tokenizer.add_special_tokens(SPECIAL_TOKENS)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_vocab(tokenizer.vocab_size)
    if added:  # SFT teaches a base model the chat tokens; the later stages expect a chat checkpoint
        log(f"{section}: added chat tokens {' '.join(added)} to the tokenizer; vocab now {tokenizer.vocab_size}"
            + ("" if section == "sft" else " (was --init a chat checkpoint?)"))
    model.train()
    return model, tokenizer, added


def build_examples(convs: list, tokenizer, block_size: int, overflow: str = "split") -> tuple[list, FitStats]:
    """Rendered ``(ids, labels)`` examples of at most ``block_size + 1`` ids each, and what fitting did."""
    stats = FitStats()
    examples = [ex for conv in convs for ex in fit_to_context(conv, tokenizer, block_size + 1, overflow, stats=stats)]
    return examples, stats


def collate(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(x, y)``: x = ids[:-1] (pad ``pad_id``), y = labels[1:] (pad -100)."""
    return pad([ids[:-1] for ids, _ in examples], pad_id), pad([labels[1:] for _, labels in examples], IGNORE)


@functools.lru_cache(maxsize=2)  # (the current epoch's, asked for at every micro-batch)
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every batch of one epoch over ``n`` examples: one seeded shuffle, cut into batches."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[b: b + batch_size] for b in range(0, n, batch_size)]


@torch.no_grad()
def assistant_loss(model, examples: list, pad_id: int, batch_size: int = 16,
                   max_batches: Optional[int] = None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the assistant tokens of ``examples``; returns (loss, n_tokens)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # little padding
    starts = range(0, len(order), batch_size)[:max_batches]
    batches = (collate([examples[i] for i in order[b: b + batch_size]], pad_id) for b in starts)
    return mean_loss(model, batches, next(model.parameters()).device)


class SFTStage:
    """Batches of rendered conversations; loss = mean cross-entropy over assistant tokens."""

    name = "sft"

    def __init__(self, train_examples: list, val_examples: list, pad_id: int, batch_size: int, seed: int = 1337,
                 bytes_per_token: Optional[float] = None):
        if not train_examples:
            raise UserError("sft: no training examples (every conversation was skipped; see the counts above)")
        self.train, self.val, self.pad_id = train_examples, val_examples, pad_id
        self.batch_size, self.seed, self.bytes_per_token = batch_size, seed, bytes_per_token  # of the held-out replies
        self.grad_accum, self.eval_batches = 1, None

    def setup(self, trainer) -> None:
        self.grad_accum = trainer.cfg.grad_accum
        self.eval_batches = trainer.cfg.eval_batches or None

    def get_batch(self, step: int, micro: int):
        rank, world, _ = world_info()
        k = (step * self.grad_accum + micro) * world + rank  # = micro * W + r of one process with W x grad_accum
        epoch, pos = divmod(k, math.ceil(len(self.train) / self.batch_size))
        batch = epoch_batches(len(self.train), self.batch_size, self.seed, epoch)[pos]
        return collate([self.train[i] for i in batch], self.pad_id)

    def tokens_in_batch(self, batch) -> int:
        return int((batch[0] != self.pad_id).sum())

    loss = PretrainStage.loss  # the model's own loss of (x, y) batches

    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        loss, _ = assistant_loss(model, self.val, self.pad_id, self.batch_size, self.eval_batches)
        return val_metrics(loss, self.bytes_per_token)

    def state_dict(self) -> dict:  # batches are a pure function of (seed, step): nothing else to save
        return {"train_examples": len(self.train), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        n = state.get("train_examples")
        if n is not None and n != len(self.train):
            print(f"warning: resuming with {len(self.train)} training examples, the checkpoint had {n} "
                  "(different data or settings): batches will differ from an uninterrupted run", file=sys.stderr)


def _stderr_on_rank0(line: str) -> None:
    """The default ``log`` of the stages: stderr, once per run under torchrun."""
    if world_info()[0] == 0:
        print(line, file=sys.stderr)


def run_sft(init: str | Path, out: str | Path, sft: SFTConfig, train, *, run_config: Optional[dict] = None,
            resume: Optional[bool] = None, log=None) -> dict:
    """Fine-tune ``init`` on ``sft.data`` with the Trainer; returns the Trainer's final metrics (+ data counts)."""
    log = log or _stderr_on_rank0
    model, tokenizer, added = load_init(init, log, "sft")
    block = context_size(sft.block_size, model.config.block_size, "[sft] block_size")
    convs = read_conversations(sft.data, skip_bad=sft.skip_bad, report=log)
    if sft.max_conversations and len(convs) > sft.max_conversations:
        convs = random.Random(train.seed).sample(convs, sft.max_conversations)
    if sft.val_data:
        train_convs, val_convs = convs, read_conversations(sft.val_data, skip_bad=sft.skip_bad, report=log)
    else:
        train_convs, val_convs = split(convs, sft.val_fraction, train.seed, most=sft.val_max)
    train_ex, tstats = build_examples(train_convs, tokenizer, block, sft.overflow)
    val_ex, vstats = build_examples(val_convs, tokenizer, block, sft.overflow)
    log(f"sft: train {tstats.summary()}")
    if val_convs:
        log(f"sft: held-out {vstats.summary()}")
    n_tokens = sum(len(ids) - 1 for ids, _ in train_ex)
    n_labels = sum(sum(1 for lab in labels[1:] if lab != IGNORE) for _, labels in train_ex)
    log(f"sft: {n_tokens:,} training tokens, {n_labels:,} of them assistant tokens (trained)")

    ids = sorted(tokenizer.token_id(name) for name in added)  # appended: one run of ids
    apply_lora(model, train, log, range(ids[0], ids[-1] + 1) if ids else range(0))
    stage = SFTStage(train_ex, val_ex, tokenizer.pad_id, train.batch_size, seed=train.seed,
                     bytes_per_token=bytes_per_token(tokenizer, [t for _, lab in val_ex for t in lab if t != IGNORE]))
    cfg = {**(run_config or {}), "sft": {**sft.to_dict(), "init": str(init)}, "train": train.to_dict()}
    log(f"sft: {model.num_params() / 1e6:.2f}M parameters, context {block}, "
        f"{len(train_ex)} training / {len(val_ex)} held-out examples -> {out}")
    with Trainer(model, stage, train, out, tokenizer=tokenizer, run_config=cfg, resume=resume) as trainer:
        result = trainer.fit()
    result["data"] = {"conversations": len(convs), "train": asdict(tstats), "val": asdict(vstats),
                      "block_size": block, "train_tokens": n_tokens, "assistant_tokens": n_labels,
                      "added_tokens": added}
    return result
