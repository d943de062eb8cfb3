"""Supervised fine-tuning (SFT): turn a pretrained model into a chat model on conversation JSONL.

    conversations ──chat.render (fit_to_context)──▶ (ids, labels) examples ──padded batches──▶ Trainer

* Every conversation is rendered with the one chat template (``pocketgpt.chat.render``); labels are ``-100``
  except on assistant content and the ``<|end|>`` that closes each assistant turn, so the loss is the mean
  cross-entropy over assistant tokens only, and every assistant turn of a multi-turn conversation is trained.
* Conversations longer than the context are split at turn boundaries (``overflow = "split"``, the default) or cut
  to their leading turns (``"truncate"``); the counts are printed (see ``chat.fit_to_context``).
* Batches are **padded**, not packed: each row is one example, right-padded with ``<|pad|>`` (label ``-100``).
  Causal attention never lets a real token see a pad that comes after it, so no attention mask is needed and a
  row is computed exactly as it would be alone. Each epoch is a seeded shuffle of all examples, so every batch is
  a random mixture of every source (length-sorted batches would put the short sources, e.g. arithmetic, in batches
  of their own, and the loss would swing between sources from one batch to the next); a pure function of the seed
  and the epoch, so resume is exact with no data state to save.
* With gradient accumulation the step loss is the mean of the micro-batches' token means.
* Held-out evaluation: a seeded fraction of the *conversations* (never pieces of a training conversation) gives
  ``val_loss`` (assistant-token cross-entropy, token-weighted), ``val_ppl`` and ``val_bpb`` (bits per UTF-8 byte
  of the replies).

``--init`` takes a pocketgpt checkpoint or a Hugging Face GPT-2 / Llama directory (or ``hf:NAME`` from the Hub); a
tokenizer without the chat tokens (GPT-2's) gets them appended and the model's embedding rows are grown to match
(``GPT.resize_vocab``).
The run directory is the Trainer's: ``RUN/ckpt`` (final model, with ``tokenizer/``) is what ``pocketgpt chat
--ckpt RUN/ckpt`` talks to; ``RUN/best`` holds the best held-out weights.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch

from ..chat import IGNORE, FitStats, fit_to_context
from pydantic import Field

from ..config import Config, StrList
from ..errors import UserError
from .pretrain import bits_per_byte, bytes_per_token
from .trainer import TrainConfig
from ..records import pad, read_conversations, split

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


# --------------------------------------------------------------------------------------------------------------------
# model + tokenizer to start from


def load_init(path: str | Path, device=None):
    """Model + tokenizer of ``--init``; adds the chat special tokens (and embedding rows) when the tokenizer lacks
    them. Returns ``(model, tokenizer, added_token_names)``."""
    from ..checkpoint import load_model, local_dir
    from ..tokenizer import SPECIAL_TOKENS, load_tokenizer_for

    path = local_dir(path)
    model = load_model(path, device=device)
    tokenizer = load_tokenizer_for(path)
    added = tokenizer.add_special_tokens(SPECIAL_TOKENS)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_vocab(tokenizer.vocab_size)
    model.train()
    return model, tokenizer, added


# --------------------------------------------------------------------------------------------------------------------
# data


def build_examples(convs: list, tokenizer, block_size: int, overflow: str = "split") -> tuple[list, FitStats]:
    """Rendered ``(ids, labels)`` examples of at most ``block_size + 1`` ids each, and what fitting did."""
    stats = FitStats()
    examples = []
    for conv in convs:
        examples += fit_to_context(conv, tokenizer, block_size + 1, mode=overflow, stats=stats)
    return examples, stats


def collate(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(x, y)``: x = ids[:-1] (pad ``pad_id``), y = labels[1:] (pad -100)."""
    return pad([ids[:-1] for ids, _ in examples], pad_id), pad([labels[1:] for _, labels in examples], IGNORE)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every batch of one epoch over ``n`` examples: one seeded shuffle, cut into batches."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[b: b + batch_size] for b in range(0, n, batch_size)]


@torch.no_grad()
def assistant_loss(model, examples: list, pad_id: int, batch_size: int = 16,
                   max_batches: Optional[int] = None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the assistant tokens of ``examples``; returns (loss, n_tokens)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # little padding
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x, y = collate([examples[i] for i in order[start: start + batch_size]], pad_id)
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE,
                               reduction="sum")
        total += float(loss)
        count += int((y != IGNORE).sum())
    return (total / count if count else float("nan")), count


# --------------------------------------------------------------------------------------------------------------------
# the stage


class SFTStage:
    """Batches of rendered conversations; loss = mean cross-entropy over assistant tokens."""

    name = "sft"

    def __init__(self, train_examples: list, val_examples: list, pad_id: int, batch_size: int, seed: int = 1337):
        if not train_examples:
            raise UserError("sft: no training examples (every conversation was skipped; see the counts above)")
        self.train = train_examples
        self.val = val_examples
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.seed = seed
        self.grad_accum = 1
        self.eval_batches: Optional[int] = None
        self.bytes_per_token: Optional[float] = None  # of the held-out replies (run_sft sets it), for bits per byte
        self._epoch_cache: tuple[int, list] = (-1, [])

    def setup(self, trainer) -> None:
        self.grad_accum = trainer.cfg.grad_accum
        self.eval_batches = trainer.cfg.eval_batches or None

    def _batch_indices(self, k: int) -> list[int]:
        """The k-th micro-batch of the whole run (0-based), across epochs."""
        n = math.ceil(len(self.train) / self.batch_size)
        epoch, pos = divmod(k, n)
        if self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(len(self.train), self.batch_size, self.seed, epoch))
        return self._epoch_cache[1][pos]

    def get_batch(self, step: int, micro: int):
        from .trainer import world_info

        rank, world, _ = world_info()
        k = (step * self.grad_accum + micro) * world + rank  # = micro * W + r of one process with W x grad_accum
        return collate([self.train[i] for i in self._batch_indices(k)], self.pad_id)

    def tokens_in_batch(self, batch) -> int:
        x, _ = batch
        return int((x != self.pad_id).sum())

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        loss, _ = assistant_loss(model, self.val, self.pad_id, self.batch_size, self.eval_batches)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **bits_per_byte(loss, self.bytes_per_token)}

    def state_dict(self) -> dict:  # batches are a pure function of (seed, step): nothing else to save
        return {"train_examples": len(self.train), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        n = state.get("train_examples")
        if n is not None and n != len(self.train):
            print(f"warning: resuming with {len(self.train)} training examples, the checkpoint had {n} "
                  "(different data or settings): batches will differ from an uninterrupted run", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------------
# running a fine-tune


def _stderr_on_rank0(line: str) -> None:
    """The default ``log`` of the stages: stderr, once per run under torchrun."""
    from .trainer import world_info

    if world_info()[0] == 0:
        print(line, file=sys.stderr)


def prepare_sft(init: str | Path, sft: SFTConfig, train_seed: int, device=None, log=print):
    """Load the model and data, split and render them. Returns ``(model, tokenizer, train_ex, val_ex, info)``."""
    model, tokenizer, added = load_init(init, device=device)
    if added:
        log(f"sft: added chat tokens {' '.join(added)} to the tokenizer; vocab now {tokenizer.vocab_size}")
    block = sft.block_size or model.config.block_size
    if block > model.config.block_size:
        raise UserError(f"[sft] block_size: {block} is larger than the model's context of "
                        f"{model.config.block_size} tokens")
    convs = read_conversations(sft.data, skip_bad=sft.skip_bad, report=log)
    if sft.max_conversations and len(convs) > sft.max_conversations:
        convs = random.Random(train_seed).sample(convs, sft.max_conversations)
    if sft.val_data:
        train_convs, val_convs = convs, read_conversations(sft.val_data, skip_bad=sft.skip_bad, report=log)
    else:
        train_convs, val_convs = split(convs, sft.val_fraction, train_seed, most=sft.val_max)
    train_ex, tstats = build_examples(train_convs, tokenizer, block, sft.overflow)
    val_ex, vstats = build_examples(val_convs, tokenizer, block, sft.overflow)
    log(f"sft: train {tstats.summary()}")
    if val_convs:
        log(f"sft: held-out {vstats.summary()}")
    n_tokens = sum(len(ids) - 1 for ids, _ in train_ex)
    n_labels = sum(sum(1 for lab in labels[1:] if lab != IGNORE) for _, labels in train_ex)
    log(f"sft: {n_tokens:,} training tokens, {n_labels:,} of them assistant tokens (trained)")
    info = {"conversations": len(convs), "train": asdict(tstats), "val": asdict(vstats), "block_size": block,
            "train_tokens": n_tokens, "assistant_tokens": n_labels, "added_tokens": added}
    return model, tokenizer, train_ex, val_ex, info


def run_sft(init: str | Path, out: str | Path, sft: SFTConfig, train, *, run_config: Optional[dict] = None,
            resume: Optional[bool] = None, log=None) -> dict:
    """Fine-tune ``init`` on ``sft.data`` with the Trainer; returns the Trainer's final metrics (+ data counts)."""
    from ..lora import apply as apply_lora
    from .trainer import Trainer

    log = log or _stderr_on_rank0
    model, tokenizer, train_ex, val_ex, info = prepare_sft(init, sft, train.seed, log=log)
    ids = sorted(tokenizer.token_id(name) for name in info["added_tokens"])  # appended: one run of ids
    apply_lora(model, train, log, range(ids[0], ids[-1] + 1) if ids else range(0))
    stage = SFTStage(train_ex, val_ex, tokenizer.pad_id, train.batch_size, seed=train.seed)
    stage.bytes_per_token = bytes_per_token(tokenizer, [t for _, labels in val_ex for t in labels if t != IGNORE])
    cfg = run_config if run_config is not None else {}
    cfg = {**cfg, "sft": {**sft.to_dict(), "init": str(init)}, "train": train.to_dict()}
    log(f"sft: {model.num_params() / 1e6:.2f}M parameters, context {info['block_size']}, "
        f"{len(train_ex)} training / {len(val_ex)} held-out examples -> {out}")
    trainer = Trainer(model, stage, train, out, tokenizer=tokenizer, run_config=cfg, resume=resume)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    result["data"] = info
    return result
