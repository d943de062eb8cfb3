"""Reward model: a GPT backbone with a scalar head read at the reply's closing ``<|end|>``, trained on preference
pairs with the Bradley–Terry loss (files and metrics: docs/internals.md)::

    prompt + reply ──chat template──▶ ids ──GPT──▶ h[last real token] ──head──▶ r
    loss = −log σ(r_chosen − r_rejected)        (the chosen reply should score higher than the rejected one)
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import ClassVar, Optional

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from safetensors import SafetensorError

from ..chat import render, stop_id
from ..checkpoint import find_checkpoint, load_model, write_model
from ..config import Config
from ..errors import UserError
from ..io import write_json
from ..lora import apply as apply_lora
from ..records import Pair, conversation, fit, pad, pair, read, read_pairs, split
from ..runtime import pick_device
from ..tokenizer import load_tokenizer_for
from .sft import _stderr_on_rank0
from .trainer import Trainer, TrainConfig, default_load_model, world_info

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class ScalarHead(nn.Linear):
    """``Linear(n_embd, 1)`` on final hidden states → one float32 number per position: the reward model's head and
    PPO's value head. ``std`` 0 starts at exactly 0 (a value head); a seeded ``generator`` makes every process agree."""

    def __init__(self, n_embd: int, std: float = 0.0, generator: Optional[torch.Generator] = None):
        super().__init__(n_embd, 1)
        with torch.no_grad():
            self.weight.normal_(0.0, std, generator=generator) if std > 0 else self.weight.zero_()
            self.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1).float()


class RewardModel(nn.Module):
    """``GPT`` backbone + a ``ScalarHead`` read at the last real token of each (right-padded) row."""

    def __init__(self, backbone: nn.Module, seed: int = 0):
        super().__init__()
        self.backbone, self.config = backbone, backbone.config
        # seeded: the same head in every process (exact resume, DDP)
        self.head = ScalarHead(backbone.config.n_embd, std=1.0 / (backbone.config.n_embd ** 0.5 * 4),
                               generator=torch.Generator().manual_seed(seed))
        if not backbone.config.tie_embeddings:  # the head reads hidden states: an untied lm_head is never used,
            backbone.lm_head.weight.requires_grad_(False)  # and DDP needs every trainable parameter to be

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded ids, lengths (B,) real lengths → rewards (B,) in float32."""
        _, last = self.backbone(idx, at=(lengths - 1).clamp(min=0).unsqueeze(1))  # hidden state of the last token
        return self.head(last[:, 0])

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        return self.backbone.flops_per_token(seq_len)

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]], pad_id: int = 0, batch_size: int = 16) -> list[float]:
        """Rewards of already-rendered sequences (no grad), in batches."""
        out: list[float] = []
        for i in range(0, len(rows), batch_size):
            idx, lengths = pad_rows(rows[i: i + batch_size], pad_id, self.head.weight.device)
            out += self(idx, lengths).tolist()
        return out

    def write_files(self, directory: str | Path) -> None:
        """Backbone files + head + metadata into an existing directory (the Trainer's ``save_model``)."""
        write_model(self.backbone, directory)
        safetensors.torch.save_model(self.head, str(Path(directory) / HEAD_FILE), metadata={"format": "pt"})
        write_json(Path(directory) / META_FILE, {"kind": "reward_model"})


def load_reward_model(directory: str | Path, device=None, dtype=None) -> RewardModel:
    """Load a reward-model checkpoint (eval mode). UserError if the directory has no reward head."""
    directory = Path(directory)
    head_path = directory / HEAD_FILE
    if directory.is_dir() and (directory / "config.json").is_file() and not head_path.is_file():
        raise UserError(f"{directory}: not a reward model (no {HEAD_FILE}); train one with pocketgpt rm --init ...")
    backbone = load_model(directory, device=device, dtype=dtype)
    rm = RewardModel(backbone)
    try:
        sd = safetensors.torch.load_file(str(head_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{head_path}: corrupt reward head ({str(e).splitlines()[0]})") from None
    try:
        rm.head.load_state_dict(sd)
    except RuntimeError:
        raise UserError(f"{head_path}: reward head does not match the backbone width "
                        f"{backbone.config.n_embd}") from None
    rm.head.to(device=device or "cpu")
    return rm.eval()


def encode_replies(prompt: list[dict], replies: list[str], tokenizer, block_size: int) -> tuple[list[int], ...]:
    """``(prompt ids, *reply ids)`` as the chat template writes them (prompt + ``<|assistant|>``, reply + ``<|end|>``),
    cut by ``records.fit``: the prompt loses its oldest tokens, a reply too long for half the context its end."""
    end = stop_id(tokenizer)
    ids = render(prompt, tokenizer, add_generation_prompt=True)[0]
    return fit(ids, block_size, *[tokenizer.encode(r) + [end] for r in replies])


def encode_reply(prompt: list[dict], reply: str, tokenizer, block_size: int) -> list[int]:
    p, r = encode_replies(prompt, [reply], tokenizer, block_size)
    return p + r


def pad_rows(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row → (idx (B, T), lengths (B,))."""
    return pad(rows, pad_id).to(device), torch.tensor([max(1, len(r)) for r in rows]).to(device)


def encode_pairs(pairs: list[Pair], tokenizer, block_size: int) -> list[tuple[list[int], list[int]]]:
    return [(encode_reply(p.prompt, p.chosen, tokenizer, block_size),
             encode_reply(p.prompt, p.rejected, tokenizer, block_size)) for p in pairs]


def bradley_terry(r: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the scores ``r`` of chosen replies, then rejected ones, and its accuracy and mean margin."""
    margin = r[: len(r) // 2] - r[len(r) // 2:]
    m = margin.detach()
    return -F.logsigmoid(margin).mean(), {"accuracy": float((m > 0).float().mean()), "margin": float(m.mean())}


class RMConfig(Config):
    """Reward-model options (TOML section ``[rm]``)."""

    section: ClassVar[str] = "rm"
    val_fraction: float = Field(0.1, ge=0, lt=1)  # pairs held out for pairwise accuracy (when no --val-data is given)
    split_seed: int = Field(0, ge=0)  # the held-out split is fixed by this seed
    max_pairs: int = Field(0, ge=0)  # use only the first N pairs of --data (0 = all)
    max_len: int = Field(0, ge=0)  # tokens per rendered reply (0 = the model's context); longer rows keep their end
    eval_batch_size: int = Field(16, gt=0)


SECTIONS = {"train": TrainConfig, "rm": RMConfig}  # the config of `pocketgpt rm`


@functools.lru_cache(maxsize=2)
def _shuffled(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class RewardStage:
    """Bradley–Terry training on encoded pairs; ``evaluate`` reports held-out pairwise accuracy."""

    name = "rm"
    plot_keys = ["accuracy", "margin"]  # train curves with their held-out twins eval_accuracy, eval_margin

    def __init__(self, train: list[tuple[list[int], list[int]]], val: list[tuple[list[int], list[int]]],
                 batch_size: int, pad_id: int, seed: int = 1337, eval_batch_size: int = 16):
        if not train:
            raise UserError("reward model: no training pairs")
        self.train, self.val, self.batch_size, self.pad_id = train, val, batch_size, pad_id
        self.seed, self.eval_batch_size = seed, eval_batch_size
        # what it trains on: a run directory resumes on the same pairs only
        self.fingerprint = hashlib.sha256(repr((train, val)).encode()).hexdigest()

    def setup(self, trainer) -> None:
        self.grad_accum = trainer.cfg.grad_accum

    def get_batch(self, step: int, micro: int):
        rank, world, _ = world_info()
        n = len(self.train)
        start = ((step * self.grad_accum + micro) * world + rank) * self.batch_size
        # the k-th pair of a stream of seeded epoch shuffles: resumable from the step alone
        pairs = [self.train[_shuffled(n, self.seed * 1000003 + k // n)[k % n]]
                 for k in range(start, start + self.batch_size)]
        idx, lengths = pad_rows([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id)
        return {"idx": idx, "lengths": lengths}

    def tokens_in_batch(self, batch) -> int:
        return int(batch["lengths"].sum())

    def loss(self, model, batch):
        return bradley_terry(model(batch["idx"], batch["lengths"]))

    def evaluate(self, model) -> dict[str, float]:
        if not self.val:
            return {}
        rows = [c for c, _ in self.val] + [r for _, r in self.val]
        loss, m = bradley_terry(torch.tensor(model.score_ids(rows, self.pad_id, self.eval_batch_size)))
        return {"val_loss": float(loss), "eval_accuracy": m["accuracy"], "eval_margin": m["margin"]}

    def state_dict(self) -> dict:
        return {}  # the batch order follows from the step number alone

    def load_state_dict(self, state: dict) -> None:
        pass


def _load_rm(model: RewardModel, directory: Path) -> None:
    default_load_model(model.backbone, directory)
    safetensors.torch.load_model(model.head, str(Path(directory) / HEAD_FILE))


def train_reward_model(init: str | Path, data: str | Path, out: str | Path, run_config, *,
                       val_data: Optional[str | Path] = None, resume: Optional[bool] = None) -> dict:
    """Train a reward model from ``init`` (an SFT checkpoint) on a pairs file; returns the final metrics."""
    cfg, rmcfg = run_config["train"], run_config["rm"]
    init = find_checkpoint(init)
    tokenizer = load_tokenizer_for(init)
    backbone = load_model(init)
    if tokenizer.vocab_size > backbone.config.vocab_size:
        raise UserError(f"{init}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{backbone.config.vocab_size}")
    pairs = read_pairs(data)[: rmcfg.max_pairs or None]
    if val_data is not None:
        train_pairs, val_pairs = pairs, read_pairs(val_data)
    else:
        train_pairs, val_pairs = split(pairs, rmcfg.val_fraction, rmcfg.split_seed)
    block = min(rmcfg.max_len or backbone.config.block_size, backbone.config.block_size)
    stage = RewardStage(encode_pairs(train_pairs, tokenizer, block), encode_pairs(val_pairs, tokenizer, block),
                        cfg.batch_size, tokenizer.pad_id, seed=cfg.seed, eval_batch_size=rmcfg.eval_batch_size)
    _stderr_on_rank0(f"reward model: {len(train_pairs)} training pairs, {len(val_pairs)} held out; init {init}")
    apply_lora(backbone, cfg, _stderr_on_rank0)
    model = RewardModel(backbone, seed=cfg.seed)  # after the adapters: the head stays trainable
    with Trainer(model, stage, cfg, out, tokenizer=tokenizer, save_model=RewardModel.write_files,
                 load_model=_load_rm, run_config=run_config.to_dict(), resume=resume) as trainer:
        result = trainer.fit()
    meta = {"kind": "reward_model", "init": str(init), "data": str(data), "train_pairs": len(train_pairs),
            "val_pairs": len(val_pairs), "val_accuracy": result.get("eval_accuracy"), "step": result.get("step")}
    for d in (trainer.ckpt_dir, trainer.best_dir) if trainer.is_main else ():
        if (d / HEAD_FILE).is_file():
            write_json(d / META_FILE, meta)
    return result


def score_file(ckpt: str | Path, data: str | Path, *, device: str = "auto", batch_size: int = 16) -> dict:
    """Scores of a pairs file (both replies, and the accuracy) or a conversations file (one per conversation)."""
    ckpt = find_checkpoint(ckpt)
    rm = load_reward_model(ckpt, device=pick_device(device))
    tokenizer = load_tokenizer_for(ckpt)
    block = rm.config.block_size
    records = read(data, lambda value, where: (value, where), what="records")
    if isinstance(records[0][0], dict) and "chosen" in records[0][0]:
        pairs = [pair(value, where) for value, where in records]
        enc = encode_pairs(pairs, tokenizer, block)
        rc = rm.score_ids([c for c, _ in enc], tokenizer.pad_id, batch_size)
        rr = rm.score_ids([r for _, r in enc], tokenizer.pad_id, batch_size)
        rows = [{"where": p.where, "chosen": a, "rejected": b, "correct": a > b} for p, a, b in zip(pairs, rc, rr)]
        return {"kind": "pairs", "rows": rows, "accuracy": sum(r["correct"] for r in rows) / len(rows)}
    rows = []
    for value, where in records:
        msgs = conversation(value, where)
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: the conversation must end with the assistant reply to score")
        rows.append(encode_reply(msgs[:-1], msgs[-1]["content"], tokenizer, block))
    scores = rm.score_ids(rows, tokenizer.pad_id, batch_size)
    return {"kind": "conversations", "rows": [{"where": w, "score": s} for (_, w), s in zip(records, scores)]}
