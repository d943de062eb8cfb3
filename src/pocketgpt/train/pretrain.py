"""Pretraining: next-token prediction on token shards made by ``pocketgpt prepare``, driven by the one Trainer.
Rank r of W at micro-batch m of step s draws the windows one process draws at micro m*W + r (a generator seeded by
(seed, s, m*W + r)): N processes train what one does with N x grad_accum, and resume needs no data position.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
from pydantic import Field

from .. import runtime
from ..checkpoint import load_model, local_dir
from ..config import Config
from ..data import TokenShards, check_tokenizer, read_meta
from ..errors import UserError
from ..model import GPT, GPTConfig
from ..tokenizer import load_tokenizer_for
from .trainer import TrainConfig, world_info


class DataConfig(Config):
    """``[data]``: where the shards are and how long a training window is."""

    section: ClassVar[str] = "data"
    dir: str = ""
    block_size: Optional[int] = Field(None, ge=0)  # tokens per window; default = [model] block_size
    train_split: str = "train"
    val_split: str = "val"


SECTIONS = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}


def window_seed(seed: int, step: int, global_micro: int) -> int:
    """A well-mixed 63-bit seed for the windows of (step, global micro-batch)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, global_micro]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class PretrainStage:
    """Random windows from the train split; validation loss + perplexity on sequential val windows."""

    name = "pretrain"

    def __init__(self, train, val, batch_size: int, seed: int = 1337, eval_batches: int = 20,
                 fingerprint: Optional[str] = None, bytes_per_token: Optional[float] = None):
        self.train, self.val, self.batch_size, self.seed, self.eval_batches = train, val, batch_size, seed, eval_batches
        self.fingerprint = fingerprint  # the prepared data's (meta.json): a run resumes on the same data only
        self.bytes_per_token = bytes_per_token  # of the val split, for bits per byte

    def get_batch(self, step: int, micro: int):
        rank, world, _ = world_info()
        g = torch.Generator().manual_seed(window_seed(self.seed, step, micro * world + rank))
        return self.train.get_batch(self.batch_size, g)

    def tokens_in_batch(self, batch) -> int:
        return int(batch[0].numel())

    def loss(self, model, batch):
        return model(*batch)[1], {}  # model(x, y) → (logits, loss)

    def evaluate(self, model) -> dict[str, float]:
        if self.val is None:
            return {}
        device = next(model.parameters()).device
        return evaluate_lm(model, self.val, self.batch_size, self.eval_batches, device, self.bytes_per_token)

    def state_dict(self) -> dict:
        return {"seed": self.seed}  # windows depend only on (seed, step, micro): nothing else to restore

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state.get("seed", self.seed))


def bytes_per_token(tokenizer, ids) -> Optional[float]:
    """UTF-8 bytes per token of the text ``ids`` encode (special tokens count none: they are not text): bits per
    byte = loss / (ln 2 × this), comparable across tokenizers. None without a tokenizer."""
    if tokenizer is None:
        return None
    special = set(tokenizer.special_ids.values())
    lengths = np.array([0 if i in special else len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)])
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(lengths))[:len(lengths)]
    n_bytes = int(counts @ lengths)
    return n_bytes / int(counts.sum()) if n_bytes else None


def val_metrics(loss: float, bytes_per_token: Optional[float]) -> dict[str, float]:
    """``val_loss``, its perplexity and, with ``bytes_per_token``, bits per byte (comparable across tokenizers)."""
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["val_bpb"] = loss / (math.log(2) * bytes_per_token)
    return out


def mean_loss(model, batches, device) -> tuple[float, int]:
    """Token-weighted mean loss of ``model(x, y)`` over ``(x, y)`` batches (targets -100 ignored), and the count."""
    total, count = 0.0, 0
    for x, y in batches:
        n = int((y != -100).sum())
        if n:  # (a batch without targets has a NaN mean)
            total += float(model(x.to(device), y.to(device))[1]) * n
            count += n
    return (total / count if count else float("nan")), count


def evaluate_lm(model, shards, batch_size: int, max_batches: Optional[int], device,
                bytes_per_token: Optional[float] = None) -> dict[str, float]:
    """``val_metrics`` of sequential windows of ``shards`` (all, or ``max_batches`` spread over the split)."""
    loss, count = mean_loss(model, shards.iter_eval(batch_size, max_batches or None), device)
    return val_metrics(loss, bytes_per_token) if count else {}


def context_size(block_size: Optional[int], context: int, where: str) -> int:
    """The training / evaluation context: ``block_size``, or the model's ``context`` when 0; never longer."""
    if (block_size or context) > context:
        raise UserError(f"{where} ({block_size}) is larger than the model's context ({context})")
    return block_size or context


def data_tokenizer(data_dir):
    """The tokenizer ``pocketgpt prepare`` saved beside the shards, or None."""
    return load_tokenizer_for(data_dir) if (Path(data_dir) / "tokenizer").is_dir() else None


def build_pretrain(cfg, out: Path, init: Optional[str] = None):
    """Model, stage and tokenizer for a loaded ``RunConfig`` (sections model / train / data)."""
    data: DataConfig = cfg["data"]
    tcfg: TrainConfig = cfg["train"]
    meta = read_meta(data.dir, "[data] dir")
    vocab = int(meta.get("vocab_size", 0))

    runtime.seed_everything(tcfg.seed)
    if init:
        init = local_dir(init)
        check_tokenizer(init, data.dir)
        model = load_model(init)
        if cfg.explicit.get("model"):
            print(f"note: --init {init}: the [model] settings come from the checkpoint", file=sys.stderr)
        cfg.sections["model"] = mcfg = model.config
    else:
        mcfg = cfg.rebuild("model", **({"vocab_size": vocab} if vocab else {}))
        model = GPT(mcfg)
    if vocab and mcfg.vocab_size < vocab:
        raise UserError(f"[model] vocab_size ({mcfg.vocab_size}) is smaller than the data's vocabulary "
                        f"({vocab}, {Path(data.dir) / 'meta.json'})")
    block = context_size(data.block_size, mcfg.block_size, "[data] block_size")
    if data.block_size is None:
        data.block_size = block

    train = TokenShards(data.dir, data.train_split, block)
    has_val = (Path(data.dir) / f"{data.val_split}.bin").exists()
    val = TokenShards(data.dir, data.val_split, block) if has_val else None
    if not has_val and tcfg.eval_interval:
        print(f"note: {data.dir} has no {data.val_split}.bin: no validation", file=sys.stderr)
    tokenizer = data_tokenizer(data.dir)
    stage = PretrainStage(train, val, tcfg.batch_size, tcfg.seed, tcfg.eval_batches, meta.get("fingerprint"),
                          bytes_per_token(tokenizer, val.data) if val is not None else None)
    return model, stage, tokenizer


def evaluate_checkpoint(ckpt, data, split: str = "val", *, batch_size: int = 8, max_batches: int = 0,
                        block_size: Optional[int] = None, device: str = "auto", dtype: str = "auto") -> dict:
    """``evaluate_lm``'s metrics of a checkpoint on one split of a data directory (``pocketgpt eval``)."""
    device = runtime.pick_device(device)
    dtype = runtime.pick_dtype(dtype, device)
    check_tokenizer(ckpt, data)
    model = load_model(ckpt, device=device).eval()
    block = context_size(block_size, model.config.block_size, "--block_size")
    meta = read_meta(data, where="--data")
    if meta.get("vocab_size") and int(meta["vocab_size"]) > model.config.vocab_size:
        raise UserError(f"{data}: token ids go up to {meta['vocab_size']} but {ckpt} has a vocabulary of "
                        f"{model.config.vocab_size} (different tokenizer?)")
    shards = TokenShards(data, split, block)  # (too short a split: its one clear line)
    with torch.no_grad(), runtime.autocast(device, dtype):
        return evaluate_lm(model, shards, batch_size, max_batches, device,
                           bytes_per_token(data_tokenizer(data), shards.data))
