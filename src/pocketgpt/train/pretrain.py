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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import check_tokenizer
from ..errors import UserError
from .trainer import TrainConfig, Trainer, world_info


@dataclass
class DataConfig:
    """``[data]``: where the shards are and how long a training window is."""

    dir: str = ""
    block_size: Optional[int] = None  # tokens per window; default = [model] block_size
    train_split: str = "train"
    val_split: str = "val"


def _sections():
    from ..model import GPTConfig

    return {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}


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
                 fingerprint: Optional[str] = None):
        self.train = train
        self.fingerprint = fingerprint  # the prepared data's (meta.json): a run resumes on the same data only
        self.val = val
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batches = eval_batches
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
        return evaluate_lm(model, self.val, self.batch_size, self.eval_batches, self.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed}  # windows depend only on (seed, step, micro): nothing else to restore

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state.get("seed", self.seed))


def evaluate_lm(model, shards, batch_size: int, max_batches: Optional[int], device) -> dict[str, float]:
    """Mean next-token loss over sequential windows (token-weighted) and its perplexity."""
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
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}


# --------------------------------------------------------------------------------------------------------------------
# pretrain


def build_pretrain(cfg, out: Path, init: Optional[str] = None):
    """Model, stage and tokenizer for a loaded ``RunConfig`` (sections model / train / data)."""
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
        check_tokenizer(init, data.dir)
        model = GPT.from_pretrained(init)
        mcfg = model.config
        if cfg.explicit.get("model"):
            print(f"note: --init {init}: the [model] settings come from the checkpoint", file=sys.stderr)
        cfg.sections["model"] = mcfg
    else:
        defaults = {"vocab_size": vocab} if vocab else {}
        mcfg = cfg.rebuild("model", **defaults)
        mcfg.validate(f"{cfg.path or 'config'}: [model]")
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
    stage = PretrainStage(train, val, tcfg.batch_size, tcfg.seed, tcfg.eval_batches, meta.get("fingerprint"))
    return model, stage, tokenizer


def run_pretrain(args) -> int:
    from ..config import config_from_args, resume_from_args

    cfg = config_from_args(args, _sections())
    name = Path(cfg.path).stem if cfg.path else "pretrain"
    out = Path(args.out) if args.out else Path("runs") / name
    model, stage, tokenizer = build_pretrain(cfg, out, init=args.init)
    if resume_from_args(args) is not False and (out / "ckpt").is_dir():
        check_tokenizer(out / "ckpt", cfg["data"].dir, fix="start over with --restart, or choose another --out")
    rank, world, _ = world_info()
    if rank == 0:
        n = model.num_params()
        print(f"pretrain: {n / 1e6:.2f}M parameters, {world} process(es), run dir {out}", file=sys.stderr)
    trainer = Trainer(model, stage, cfg["train"], out, tokenizer=tokenizer, run_config=cfg.to_dict(),
                      resume=resume_from_args(args))
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if rank == 0:
        parts = [f"step {result['step']}"]
        for k in ("train_loss", "val_loss", "val_ppl"):
            if k in result:
                parts.append(f"{k} {result[k]:.4f}")
        parts.append(f"{result['tok_per_s']:,.0f} tok/s")
        print("done: " + ", ".join(parts))
        print(f"final model: {out / 'ckpt'}" + (f"   best val: {out / 'best'}" if (out / "best").exists() else ""))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# eval


def run_eval(args) -> int:
    from ..model import GPT
    from .. import runtime

    device = runtime.pick_device(args.device)
    dtype = runtime.pick_dtype(args.dtype, device)
    check_tokenizer(args.ckpt, args.data)
    model = GPT.from_pretrained(args.ckpt, device=device)
    model.eval()
    block = args.block_size or model.config.block_size
    if block > model.config.block_size:
        raise UserError(f"--block_size ({block}) is larger than the model's context ({model.config.block_size})")
    meta = read_meta(args.data) if (Path(args.data) / "meta.json").exists() else {}
    if meta.get("vocab_size") and int(meta["vocab_size"]) > model.config.vocab_size:
        raise UserError(f"{args.data}: token ids go up to {meta['vocab_size']} but {args.ckpt} has a vocabulary of "
                        f"{model.config.vocab_size} (different tokenizer?)")
    shards = open_shards(args.data, args.split, block, where="--data")
    with torch.no_grad(), runtime.autocast(device, dtype):
        m = evaluate_lm(model, shards, args.batch_size, args.max_batches, device)
    if not m:
        raise UserError(f"{args.data}: split '{args.split}' has fewer than {block + 1} tokens")
    print(f"{args.split} loss {m['val_loss']:.4f}  perplexity {m['val_ppl']:.2f}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# CLI


def configure_cli(name: str, p) -> None:
    if name == "eval":
        p.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. RUN/ckpt or RUN/best)")
        p.add_argument("--data", required=True, help="data directory made by 'pocketgpt prepare'")
        p.add_argument("--split", default="val", help="train | val | test (default: val)")
        p.add_argument("--batch_size", "--batch-size", type=int, default=8)
        p.add_argument("--max_batches", "--max-batches", type=int, default=0, help="0 = the whole split")
        p.add_argument("--block_size", "--block-size", type=int, default=None, help="window (default: model context)")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
        p.set_defaults(func=run_eval)
        return
    from ..config import add_config_arguments, add_resume_arguments
    from ..model import GPTConfig

    p.add_argument("--out", default=None, help="run directory (default: runs/CONFIG_NAME)")
    add_resume_arguments(p)
    p.add_argument("--init", default=None, metavar="CKPT", help="start from these weights (fresh optimizer)")
    add_config_arguments(p, {"model": GPTConfig, "train": TrainConfig, "data": DataConfig})
    p.set_defaults(func=run_pretrain)
