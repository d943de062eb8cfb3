"""Pretraining: next-token prediction on prepared token shards, driven by the one ``Trainer``.

    pocketgpt prepare ...                                   # text → DIR/train.bin, DIR/val.bin, DIR/meta.json
    pocketgpt pretrain --config shakespeare-char [--key value ...] [--out RUN] [--resume] [--init CKPT]
    pocketgpt eval --ckpt RUN/ckpt --data DIR [--split val]

Under ``torchrun --nproc_per_node=N`` the same command trains with DDP. Batches are drawn so that rank ``r`` of
``W`` at micro-batch ``m`` of step ``s`` gets exactly the windows one process would draw at micro ``m*W + r``
(each window set comes from a generator seeded by ``(seed, s, m*W + r)``): N processes with ``grad_accum=A`` train
the same model as one process with ``grad_accum=N*A``, and resuming needs no data position at all.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
from pydantic import Field

from ..config import Config
from ..data import check_tokenizer
from ..errors import UserError
from ..model import GPTConfig
from .trainer import TrainConfig, Trainer, world_info


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


def open_shards(data_dir: str | Path, split: str, block_size: int, where: str = "[data] dir"):
    """``pocketgpt.data.TokenShards`` with a clear error for a missing directory / split."""
    d = Path(data_dir)
    if not str(data_dir):
        raise UserError(f"{where}: no data directory given (set [data] dir or --data.dir; make one with "
                        "'pocketgpt prepare')")
    if not d.is_dir():
        raise UserError(f"{where}: data directory {d} not found (make it with 'pocketgpt prepare')")
    if not (d / f"{split}.bin").exists():
        raise UserError(f"{d}: no {split}.bin in this data directory (made by 'pocketgpt prepare')")
    from ..data import TokenShards

    return TokenShards(d, split, block_size)


def read_meta(data_dir: str | Path) -> dict:
    from ..io import read_json

    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{path}: file not found (a data directory made by 'pocketgpt prepare' has one)")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object")
    return meta


class PretrainStage:
    """Random windows from the train split; validation loss + perplexity on sequential val windows."""

    name = "pretrain"

    def __init__(self, train, val, batch_size: int, seed: int = 1337, eval_batches: int = 20,
                 fingerprint: Optional[str] = None, bytes_per_token: Optional[float] = None):
        self.train = train
        self.fingerprint = fingerprint  # the prepared data's (meta.json): a run resumes on the same data only
        self.val = val
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batches = eval_batches
        self.bytes_per_token = bytes_per_token  # of the val split, for bits per byte
        self.device = torch.device("cpu")

    def setup(self, trainer: Trainer) -> None:
        self.device = trainer.device

    def get_batch(self, step: int, micro: int):
        rank, world, _ = world_info()
        g = torch.Generator().manual_seed(window_seed(self.seed, step, micro * world + rank))
        return self.train.get_batch(self.batch_size, g)

    def tokens_in_batch(self, batch) -> int:
        return int(batch[0].numel())

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def evaluate(self, model) -> dict[str, float]:
        if self.val is None:
            return {}
        return evaluate_lm(model, self.val, self.batch_size, self.eval_batches, self.device, self.bytes_per_token)

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


def bits_per_byte(loss: float, bytes_per_token: Optional[float]) -> dict[str, float]:
    """``{"val_bpb": ...}`` for a mean loss in nats per token (empty without ``bytes_per_token``)."""
    return {"val_bpb": loss / (math.log(2) * bytes_per_token)} if bytes_per_token else {}


def evaluate_lm(model, shards, batch_size: int, max_batches: Optional[int], device,
                bytes_per_token: Optional[float] = None) -> dict[str, float]:
    """Mean next-token loss over sequential windows (token-weighted), its perplexity and bits per byte."""
    total, count = 0.0, 0
    for x, y in shards.iter_eval(batch_size, max_batches or None):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        n = int((y != -100).sum())
        total += float(loss) * n
        count += n
    if count == 0:
        return {}
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), **bits_per_byte(mean, bytes_per_token)}


# --------------------------------------------------------------------------------------------------------------------
# pretrain


def build_pretrain(cfg, out: Path, init: Optional[str] = None):
    """Model, stage and tokenizer for a loaded ``RunConfig`` (sections model / train / data)."""
    from ..checkpoint import load_model, local_dir
    from ..model import GPT
    from .. import runtime

    data: DataConfig = cfg["data"]
    tcfg: TrainConfig = cfg["train"]
    meta = read_meta(data.dir) if data.dir and Path(data.dir).is_dir() else None
    if meta is None:
        open_shards(data.dir, data.train_split, 1)  # raises the clear error
    vocab = int(meta.get("vocab_size", 0)) if meta else 0

    runtime.seed_everything(tcfg.seed)
    if init:
        init = local_dir(init)
        check_tokenizer(init, data.dir)
        model = load_model(init)
        mcfg = model.config
        if cfg.explicit.get("model"):
            print(f"note: --init {init}: the [model] settings come from the checkpoint", file=sys.stderr)
        cfg.sections["model"] = mcfg
    else:
        defaults = {"vocab_size": vocab} if vocab else {}
        mcfg = cfg.rebuild("model", **defaults)
        model = GPT(mcfg)
    if vocab and mcfg.vocab_size < vocab:
        raise UserError(f"[model] vocab_size ({mcfg.vocab_size}) is smaller than the data's vocabulary "
                        f"({vocab}, {Path(data.dir) / 'meta.json'})")
    block = data.block_size or mcfg.block_size
    if block > mcfg.block_size:
        raise UserError(f"[data] block_size ({block}) is larger than the model's context [model] block_size "
                        f"({mcfg.block_size})")
    if data.block_size is None:
        data.block_size = block

    train = open_shards(data.dir, data.train_split, block)
    val = None
    if (Path(data.dir) / f"{data.val_split}.bin").exists():
        val = open_shards(data.dir, data.val_split, block)
    elif tcfg.eval_interval:
        print(f"note: {data.dir} has no {data.val_split}.bin: no validation", file=sys.stderr)
    tokenizer = None
    if (Path(data.dir) / "tokenizer").is_dir():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(data.dir) / "tokenizer")
    stage = PretrainStage(train, val, tcfg.batch_size, tcfg.seed, tcfg.eval_batches, meta.get("fingerprint"),
                          bytes_per_token(tokenizer, val.data) if val is not None else None)
    return model, stage, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# eval


def evaluate_checkpoint(ckpt, data, split: str = "val", *, batch_size: int = 8, max_batches: int = 0,
                        block_size: Optional[int] = None, device: str = "auto", dtype: str = "auto") -> dict:
    """``val_loss``, ``val_ppl`` (and ``val_bpb`` when the data has its tokenizer) of a checkpoint on one split of a
    data directory (``pocketgpt eval``)."""
    from ..checkpoint import load_model
    from .. import runtime

    device = runtime.pick_device(device)
    dtype = runtime.pick_dtype(dtype, device)
    check_tokenizer(ckpt, data)
    model = load_model(ckpt, device=device)
    model.eval()
    block = block_size or model.config.block_size
    if block > model.config.block_size:
        raise UserError(f"--block_size ({block}) is larger than the model's context ({model.config.block_size})")
    meta = read_meta(data) if (Path(data) / "meta.json").exists() else {}
    if meta.get("vocab_size") and int(meta["vocab_size"]) > model.config.vocab_size:
        raise UserError(f"{data}: token ids go up to {meta['vocab_size']} but {ckpt} has a vocabulary of "
                        f"{model.config.vocab_size} (different tokenizer?)")
    shards = open_shards(data, split, block, where="--data")
    tok = None
    if shards.tokenizer_dir.is_dir():
        from ..tokenizer import Tokenizer

        tok = Tokenizer.load(shards.tokenizer_dir)
    with torch.no_grad(), runtime.autocast(device, dtype):
        m = evaluate_lm(model, shards, batch_size, max_batches, device, bytes_per_token(tok, shards.data))
    if not m:
        raise UserError(f"{data}: split '{split}' has fewer than {block + 1} tokens")
    return m
