"""The GPT: a decoder-only Transformer (GPT-2 / Llama options in ``GPTConfig``), read top to bottom.

    tokens ─▶ wte (+ wpe | sinusoidal) ─▶ [Block × n_layer] ─▶ norm ─▶ lm_head ─▶ logits
    Block:  x = x + attn(norm(x));  x = x + mlp(norm(x))        (pre-norm, residual stream)
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from .config import Config, FieldError


class GPTConfig(Config):
    """The architecture (TOML section ``[model]``, a checkpoint's ``config.json``)."""

    section: ClassVar[str] = "model"
    vocab_size: int = Field(50304, gt=0)
    block_size: int = Field(1024, gt=0)  # the context length
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_embd: int = Field(768, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    pos: Literal["learned", "sinusoidal", "rope"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "relu", "swiglu"] = "gelu"
    n_kv_head: Optional[int] = Field(None, gt=0)  # grouped-query attention; None = n_head (plain multi-head)
    tie_embeddings: bool = True
    mlp_hidden: Optional[int] = Field(None, gt=0)  # None = 4*n_embd (gelu/relu) or ~8/3*n_embd rounded to 64 (swiglu)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _shapes(self) -> "GPTConfig":
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(int(8 * self.n_embd / 3) / 64) if self.mlp == "swiglu" else 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise FieldError("n_embd", f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise FieldError("n_kv_head", f"({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise FieldError("n_embd", f"rope needs an even head size, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise FieldError("n_embd", f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ---- KV cache ------------------------------------------------------------------------------------------------------


class KVCache:
    """``kv[layer]`` (2, B, n_kv_head, max_len, head_dim): keys then values (a step writes both in one copy), ``k`` /
    ``v`` its halves; a forward fills ``[pos, pos+T)``, then advances ``pos``."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (2, batch_size, config.n_kv_head, max_len, config.head_dim)
        self._set([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)])
        self._spare: Optional[list[torch.Tensor]] = None
        self.pos, self.max_len = 0, max_len

    def _set(self, kv: list[torch.Tensor]) -> None:
        self.kv = kv
        self.k, self.v = [t[0] for t in kv], [t[1] for t in kv]

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beam search), written into a second buffer kept for the next call."""
        if self._spare is None or self._spare[0].shape != self.kv[0].shape:
            self._spare = [torch.empty_like(t) for t in self.kv]
        for src, dst in zip(self.kv, self._spare):
            torch.index_select(src[:, :, :, : self.pos], 1, index, out=dst[:, :, :, : self.pos])
        filled, self._spare = self._spare, self.kv
        self._set(filled)

    def repeat(self, n: int) -> None:
        """Every row becomes ``n`` consecutive copies of itself (beams sharing one prefill)."""
        self._set([t.repeat_interleave(n, dim=1) for t in self.kv])
        self._spare = None


# ---- building blocks -----------------------------------------------------------------------------------------------


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (head_dim,), in the 'rotate half' layout used by Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The original Transformer's fixed position signal: sin on even channels, cos on odd ones."""
    steps = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(steps * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleaved: sin, cos, sin, ...


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, layer: int = 0, attn_mask=None):
        B, T, C = x.shape
        sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(sizes, dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            kc, vc = kv_cache.k[layer], kv_cache.v[layer]  # written in place: no stacked temporary per step
            kc[:, :, past : past + T] = k.to(kc.dtype)
            vc[:, :, past : past + T] = v.to(vc.dtype)
            k, v = kc[:, :, : past + T].to(q.dtype), vc[:, :, : past + T].to(q.dtype)

        if self.n_kv_head != self.n_head:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))

        if attn_mask is None and past and T > 1:  # several new tokens after a cached prefix: causal with an offset
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and past == 0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(activate(self.c_fc(x), self.kind)))


def activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The MLP's nonlinearity on the output of ``c_fc`` (swiglu: gate and up fused, first half gate, second half up)."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "relu":
        return F.relu(h)
    return F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None, layer=0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


# ---- the model -----------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, init_weights: bool = True):
        """``init_weights=False`` leaves the weights uninitialised, for a checkpoint to fill: ``normal_``'s first
        call imports seconds of PyTorch internals."""
        super().__init__()
        self.config = config

        def embedding(n: int) -> nn.Embedding:
            return nn.Embedding(n, config.n_embd, _weight=None if init_weights else torch.empty(n, config.n_embd))

        self.wte = embedding(config.vocab_size)
        self.wpe = embedding(config.block_size) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if init_weights:
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_scale", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once). ``non_embedding`` drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward): 6·params + attention (12·L·d·T), as in the PaLM paper."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, kv_cache: Optional[KVCache] = None,
                position_ids: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                last_only: bool = False, at: Optional[torch.Tensor] = None):
        """``(logits, loss)`` of ``idx`` (B, T); ``targets`` (B, T) next-token ids, ``-100`` ignored (no targets: loss
        None). ``kv_cache``: past keys/values, the new ones appended; ``position_ids`` (B, T) and a boolean
        ``attn_mask`` (B, 1, T, past+T) for left-padded rows (default ``past + arange(T)``, causal); ``last_only``:
        the last position's logits (decoding); ``at`` (B, N): ``(logits, final hidden states)`` at those positions
        only (the lm_head on N rows, for value and reward heads; a DDP wrapper computes it all inside its forward)."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0).expand(B, T)
        if self.wpe is not None and int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's context of "
                             f"{self.config.block_size} tokens")

        x = self.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.wpe(position_ids)
        elif self.config.pos == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.config.n_embd).to(x.dtype)
        else:
            cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
            rope = (cos.unsqueeze(1), sin.unsqueeze(1))
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, rope, kv_cache, i, attn_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.ln_f(x)
        if at is not None:
            x = torch.gather(x, 1, at.unsqueeze(-1).expand(-1, -1, x.size(-1)))
            return self.lm_head(x), x
        logits = self.lm_head(x[:, -1:, :] if last_only else x)
        return logits, None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        w = self.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, w.device, w.dtype)

    def resize_vocab(self, new_size: int) -> None:
        """Grow (or shrink) the token table (and an untied head), as for special tokens added to a pretrained vocab;
        new rows get the mean row (a neutral start)."""

        def resized(old: torch.Tensor) -> nn.Parameter:
            n = min(new_size, old.shape[0])
            return nn.Parameter(torch.cat([old[:n], old.mean(0, keepdim=True).expand(new_size - n, -1)]))

        if new_size == self.wte.weight.shape[0]:
            return
        self.wte.weight = resized(self.wte.weight.detach())
        self.wte.num_embeddings = new_size
        self.lm_head.weight = self.wte.weight if self.config.tie_embeddings else resized(self.lm_head.weight.detach())
        self.lm_head.out_features = new_size
        self.config.vocab_size = new_size
