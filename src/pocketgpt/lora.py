"""LoRA for ``sft``, ``dpo`` and ``rm``: y = x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ, B zero at the start. Not peft's:
it renames the base weights and keeps the scale out of the state dict (checkpoints would need a name map), and its
import adds seconds to every run."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

SUFFIXES = (".lora_A", ".lora_B", ".lora_scale", ".lora_rows", ".lora_first")
RESUME_FILES = {"optimizer.safetensors", "rng.safetensors", "stage.safetensors", "trainer_state.json"}


class LoRALinear(nn.Linear):
    """``base`` (its own weight and bias, frozen) plus a trainable rank-``r`` update scaled by ``alpha / r``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)), nn.Linear's and peft's choice for A
        a = torch.empty(r, self.in_features, dtype=w.dtype).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.register_buffer("lora_scale", torch.tensor(alpha / r, device=w.device, dtype=torch.float32))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale.to(y.dtype)


class RowsEmbedding(nn.Module):
    """``base`` (frozen) whose ``rows`` are read from the trainable ``lora_rows`` instead."""

    def __init__(self, base: nn.Embedding, rows: range):
        super().__init__()
        self.weight, self.first, self.n, self.enabled = base.weight, rows.start, len(rows), True
        self.lora_rows = nn.Parameter(base.weight[rows.start: rows.stop].detach().clone())
        self.register_buffer("lora_first", torch.tensor(rows.start))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = F.embedding(idx, self.weight)
        if not self.enabled:
            return out
        new = ((idx >= self.first) & (idx < self.first + self.n)).unsqueeze(-1)
        return torch.where(new, F.embedding((idx - self.first).clamp(0, self.n - 1), self.lora_rows), out)


class RowsHead(nn.Module):
    """Output layer ``base`` (frozen) whose logits of ``rows`` come from its own ``lora_rows`` or a tied embedding's."""

    def __init__(self, base: nn.Linear, rows: range, tied: RowsEmbedding | None):
        super().__init__()
        self.weight, self.bias, self.first, self.n, self.enabled = base.weight, base.bias, rows.start, len(rows), True
        if tied is None:
            self.lora_rows = nn.Parameter(base.weight[rows.start: rows.stop].detach().clone())
            self.register_buffer("lora_first", torch.tensor(rows.start))
        object.__setattr__(self, "tied", tied)  # not a submodule: its rows are saved once, as the embedding's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        rows = self.tied.lora_rows if self.tied is not None else self.lora_rows
        return torch.cat([y[..., : self.first], F.linear(x, rows), y[..., self.first + self.n:]], -1)


ADAPTERS = (LoRALinear, RowsEmbedding, RowsHead)


def apply(model: nn.Module, train, log=None, new_tokens: range = range(0)) -> nn.Module:
    """Freeze ``model`` and put rank-``train.lora_r`` adapters (none when 0) on its ``train.lora_targets`` (module-name
    suffixes: ``c_attn``, ``mlp.c_proj``, ...), seeded by ``train.seed`` (every process builds the same ones).
    ``new_tokens`` (ids SFT added) train their rows too: frozen at one shared start, the model can't tell them apart."""
    if not train.lora_r:
        return model
    model.requires_grad_(False)
    if new_tokens:
        tied = model.lm_head.weight is model.wte.weight
        model.wte = RowsEmbedding(model.wte, new_tokens)
        model.lm_head = RowsHead(model.lm_head, new_tokens, model.wte if tied else None)
    g = torch.Generator().manual_seed(train.seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for target in train.lora_targets:
        names = [n for n in linears if n == target or n.endswith("." + target)]
        if not names:
            known = sorted({n.rsplit(".", 1)[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears})
            raise UserError(f"--lora_targets: no linear layer is named '{target}' (the model's: {', '.join(known)})")
        for name in names:
            base = linears[name]
            if base.weight is getattr(getattr(model, "wte", None), "weight", None):
                raise UserError(f"--lora_targets: '{name}' shares its weight with the token embedding "
                                "(tie_embeddings): its adapter would also change the input embedding")
            if not isinstance(base, LoRALinear):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, LoRALinear(base, train.lora_r, train.lora_alpha, g))
    if log is not None:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"lora: rank {train.lora_r}, alpha {train.lora_alpha:g} on {', '.join(train.lora_targets)}: {n:,} "
            f"trainable parameters ({100 * n / total:.2f}% of {total:,})")
    return model


def adapted(model: nn.Module) -> bool:
    return any(isinstance(m, ADAPTERS) for m in model.modules())


class WithoutAdapters(nn.Module):
    """``model`` in eval mode with its adapters switched off for each forward: the frozen base model (DPO's
    reference) without a second copy of the weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        was, layers = self.model.training, [m for m in self.model.modules() if isinstance(m, ADAPTERS)]
        self.model.eval()  # no dropout, as a frozen copy
        for m in layers:
            m.enabled = False
        try:
            return self.model(*args, **kwargs)
        finally:
            self.model.train(was)
            for m in layers:
                m.enabled = True


def fold_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with each adapter folded into its weight (W + scale · B A in fp32; trained token rows in place)."""
    out = {k: v for k, v in sd.items() if not k.endswith(SUFFIXES)}
    for key in sd:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            w = out[prefix + ".weight"]
            delta = sd[prefix + ".lora_scale"].float() * (sd[prefix + ".lora_B"].float() @ sd[key].float())
            out[prefix + ".weight"] = (w.float() + delta).to(w.dtype)
        elif key.endswith(".lora_rows"):
            prefix, rows = key[: -len(".lora_rows")], sd[key]
            first = int(sd[prefix + ".lora_first"])
            out[prefix + ".weight"] = w = out[prefix + ".weight"].clone()
            w[first: first + rows.shape[0]] = rows.to(w.dtype)
    return out


def merge(ckpt: str | Path, out: str | Path) -> None:
    """Write ``ckpt`` with its adapters folded in as a plain checkpoint ``out`` (atomic), with the files beside the
    weights (``tokenizer/``, a reward head) but not the training state."""
    from .checkpoint import load_model, save_model

    save_model(load_model(ckpt), out, ckpt, RESUME_FILES)
