"""The GPT: a decoder-only Transformer, readable top to bottom.

    tokens ─▶ wte (+ wpe | sinusoidal) ─▶ [Block × n_layer] ─▶ norm ─▶ lm_head ─▶ logits
    Block:  x = x + attn(norm(x));  x = x + mlp(norm(x))        (pre-norm, residual stream)

Options (all in ``GPTConfig``): positions ``learned`` (GPT-2) / ``sinusoidal`` (original Transformer) / ``rope``
(Llama); norm ``layernorm`` (optional bias) / ``rmsnorm``; MLP ``gelu`` (GPT-2's tanh form) / ``relu`` / ``swiglu``;
grouped-query attention via ``n_kv_head``; tied or untied embeddings.

The KV cache: ``forward(idx, kv_cache=cache)`` reads the past keys/values held in ``cache`` (a ``KVCache``),
appends the new ones in place and advances ``cache.pos``; positions continue from ``cache.pos`` for all three
position kinds (or come from ``position_ids`` for left-padded batches). The generation engine builds on this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

POS_KINDS = ("learned", "sinusoidal", "rope")
NORM_KINDS = ("layernorm", "rmsnorm")
MLP_KINDS = ("gelu", "relu", "swiglu")
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa=


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # the context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    pos: str = "learned"  # learned | sinusoidal | rope
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | relu | swiglu
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head (plain multi-head)
    tie_embeddings: bool = True
    mlp_hidden: Optional[int] = None  # None = 4*n_embd (gelu/relu) or ~8/3*n_embd rounded to 64 (swiglu)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            if self.mlp == "swiglu":
                self.mlp_hidden = 64 * math.ceil(int(8 * self.n_embd / 3) / 64)
            else:
                self.mlp_hidden = 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self, where: str = "config") -> "GPTConfig":
        """Raise ``UserError`` naming the field if the shapes or options are impossible."""

        def bad(field: str, msg: str) -> UserError:
            return UserError(f"{where}: field '{field}' {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, f"must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.pos not in POS_KINDS:
            raise bad("pos", f"must be one of {', '.join(POS_KINDS)}, got {self.pos!r}")
        if self.norm not in NORM_KINDS:
            raise bad("norm", f"must be one of {', '.join(NORM_KINDS)}, got {self.norm!r}")
        if self.mlp not in MLP_KINDS:
            raise bad("mlp", f"must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise bad("n_embd", f"rope needs an even head size, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise bad("n_embd", f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if float(self.norm_eps) <= 0:
            raise bad("norm_eps", f"must be > 0, got {self.norm_eps!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "GPTConfig":
        """Build from a dict, rejecting unknown keys with a did-you-mean hint."""
        import difflib

        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"{where}: unknown model field '{key}'{extra}")
        return cls(**d).validate(where)


# --------------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Pre-allocated keys and values for every layer.

    ``kv[layer]`` has shape (2, B, n_kv_head, max_len, head_dim): keys then values, so one decoding step writes
    both with a single copy; ``k[layer]`` / ``v[layer]`` are views of its two halves. ``pos`` is how many positions
    are filled: the model writes new keys/values at ``[pos, pos+T)`` and advances ``pos`` once per forward.
    ``reorder`` (beam search) and ``repeat`` (n samples from one prefill) act on the batch dimension.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (2, batch_size, config.n_kv_head, max_len, config.head_dim)
        self._set([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)])
        self._spare: Optional[list[torch.Tensor]] = None
        self.pos = 0
        self.max_len = max_len

    def _set(self, kv: list[torch.Tensor]) -> None:
        self.kv = kv
        self.k = [t[0] for t in kv]
        self.v = [t[1] for t in kv]

    @property
    def batch_size(self) -> int:
        return self.kv[0].shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (same batch size); copies only the filled positions, into a
        second buffer kept for the next call (beam search reorders every step)."""
        if self._spare is None or self._spare[0].shape != self.kv[0].shape:
            self._spare = [torch.empty_like(t) for t in self.kv]
        filled = self.pos
        for src, dst in zip(self.kv, self._spare):
            torch.index_select(src[:, :, :, :filled], 1, index, out=dst[:, :, :, :filled])
        spare = self.kv
        self._set(self._spare)
        self._spare = spare

    def repeat(self, n: int) -> None:
        """Every row becomes ``n`` consecutive copies of itself (n samples sharing one prefill)."""
        self._set([t.repeat_interleave(n, dim=1) for t in self.kv])
        self._spare = None


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (head_dim,), in the 'rotate half' layout used by Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The original Transformer's fixed position signal: sin on even channels, cos on odd ones."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    out = torch.empty(*positions.shape, dim, device=positions.device, dtype=torch.float32)
    out[..., 0::2] = angles.sin()
    out[..., 1::2] = angles.cos()
    return out


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, layer: int = 0, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)

        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            kc, vc = kv_cache.k[layer], kv_cache.v[layer]
            kc[:, :, past : past + T] = k.to(kc.dtype)
            vc[:, :, past : past + T] = v.to(vc.dtype)
            k, v = kc[:, :, : past + T].to(q.dtype), vc[:, :, : past + T].to(q.dtype)

        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)

        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # several new tokens after a cached prefix: causal with an offset
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        # swiglu: one fused matmul for gate and up (first half gate, second half up)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(_activate(self.c_fc(x), self.kind)))


def _activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The MLP's nonlinearity on the output of ``c_fc`` (swiglu: first half gate, second half up)."""
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
        x = x + self.mlp(self.ln_2(x))
        return x


# --------------------------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, init_weights: bool = True):
        """``init_weights=False`` leaves the weights uninitialised (for loading a checkpoint into them): building on
        the meta device then never runs ``normal_`` there, whose first call imports ~2 s of PyTorch internals."""
        super().__init__()
        config.validate()
        self.config = config

        def embedding(n: int) -> nn.Embedding:
            if init_weights:
                return nn.Embedding(n, config.n_embd)
            return nn.Embedding(n, config.n_embd, _weight=torch.empty(n, config.n_embd))

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
            std = 0.02
            if getattr(module, "residual_scale", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes -----------------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once). ``non_embedding`` drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward): 6·params + attention (12·L·d·T), as in the PaLM paper."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: Optional[int] = None) -> float:
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    # ---- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        kv_cache: Optional[KVCache] = None,
        position_ids: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
        return_hidden: bool = False,
        at: Optional[torch.Tensor] = None,
    ):
        """Return ``(logits, loss)``.

        idx: (B, T) token ids. targets: (B, T) next-token ids, ``-100`` = ignored; loss is None without targets.
        kv_cache: past keys/values; the new ones are appended and ``kv_cache.pos`` advances by T.
        position_ids: (B, T) explicit positions (left-padded batches); default ``past + arange(T)``.
        attn_mask: boolean (B, 1, T, past+T), True = may attend; default causal.
        last_only: compute logits for the last position only (decoding).
        return_hidden: return the final normalised hidden states (B, T, C) instead of logits (value/reward heads).
        at: (B, N) positions: return ``(logits, hidden)`` of those positions only — the lm_head runs on N rows, not T
            (log-probs of reply tokens), and a DDP-wrapped model computes everything inside its forward.
        """
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0).expand(B, T)
        if self.wpe is not None and int(position_ids.max()) >= self.config.block_size:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the model's context of {self.config.block_size} tokens"
            )

        x = self.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.wpe(position_ids)
        elif self.config.pos == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.config.n_embd).to(x.dtype)
        else:
            cos, sin = _rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
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
        if return_hidden:
            return x, None
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def decoder(self, groups: Optional[int] = None) -> "Decoder":
        """The fast one-token decoding step over a ``KVCache`` (see ``Decoder``); the engine's inner loop."""
        return Decoder(self, groups)

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)

    # ---- resizing (adding special tokens to a pretrained vocab) -------------------------------------------------------

    def resize_vocab(self, new_size: int) -> None:
        """Grow (or shrink) the token table; new rows get the mean embedding (a neutral start)."""
        old = self.wte.weight.data
        if new_size == old.shape[0]:
            return
        emb = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        n = min(new_size, old.shape[0])
        emb.weight.data[:n] = old[:n]
        if new_size > n:
            emb.weight.data[n:] = old.mean(0, keepdim=True)
        self.wte = emb
        if self.config.tie_embeddings:
            self.lm_head = nn.Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
            self.lm_head.weight = self.wte.weight
        else:
            head_old = self.lm_head.weight.data
            head = nn.Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
            head.weight.data[:n] = head_old[:n]
            if new_size > n:
                head.weight.data[n:] = head_old.mean(0, keepdim=True)
            self.lm_head = head
        self.config.vocab_size = new_size

    # ---- checkpoints -------------------------------------------------------------------------------------------------

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)  # safetensors stores no shared tensors; it is wte.weight
        return sd

    def write_files(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into an existing directory (not atomic on its own)."""
        from safetensors.torch import save_file

        from .io import write_json

        directory = Path(directory)
        write_json(directory / "config.json", {"model_type": "pocketgpt", **self.config.to_dict()})
        save_file(self.state_dict_for_save(), str(directory / "model.safetensors"), metadata={"format": "pt"})

    def save_pretrained(self, directory: str | Path) -> None:
        """Save as a checkpoint directory, atomically (temp dir + rename)."""
        from .io import atomic_dir

        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.write_files(tmp)
            # keep files written by other stages (tokenizer/, trainer state) that live beside the weights
            if directory.exists():
                import shutil

                for item in directory.iterdir():
                    if not (tmp / item.name).exists():
                        if item.is_dir():
                            shutil.copytree(item, tmp / item.name)
                        else:
                            shutil.copy2(item, tmp / item.name)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, dtype=None) -> "GPT":
        """Load a pocketgpt checkpoint, or a local Hugging Face GPT-2 / Llama directory."""
        from .checkpoint import load_model

        return load_model(directory, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# one-token decoding (the generation engine's inner loop)


def gemv_groups(weight: torch.Tensor) -> int:
    """Into how many blocks of output rows a few-row matmul with ``weight`` is split (1 = plain ``F.linear``).

    Measured on a 2-core AVX2 CPU: MKL's fp32 matrix-vector product runs on one core (~11 GB/s of weights); viewing
    the weight as ``g`` blocks of rows multiplied by one ``bmm`` lets every core stream its own blocks (~20 GB/s):
    a decode step of the 10.7M model drops from 3.8 to 2.0 ms of matmuls, GPT-2-124M's from 40 to 22 ms.
    bf16/fp16 weights (oneDNN) and CUDA (cuBLAS) are fastest with ``F.linear`` and are left alone.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return 1
    threads = torch.get_num_threads()
    return 1 if threads < 2 else 2 * threads


class _RowsLinear:
    """``F.linear(x, weight, bias)`` for a few rows ``x`` (R, K) as one batched matmul over ``groups`` blocks of the
    weight's output rows (views, no copy); the last ``N mod groups`` rows go through ``F.linear``."""

    MAX_ROWS = 64  # measured faster than F.linear up to 64 rows (2-core CPU); bigger GEMMs are left to MKL

    __slots__ = ("weight", "bias", "blocks", "block_bias", "tail")

    def __init__(self, linear: nn.Linear, groups: int):
        weight, bias = linear.weight, linear.bias
        self.weight, self.bias = weight, bias
        self.blocks = self.block_bias = self.tail = None
        N, K = weight.shape
        if groups > 1 and N >= 32 * groups:
            main = N - N % groups
            self.blocks = weight[:main].view(groups, main // groups, K).transpose(1, 2)  # (g, K, N/g)
            if bias is not None:
                self.block_bias = bias[:main].view(groups, 1, main // groups)
            if main < N:
                self.tail = (weight[main:], None if bias is None else bias[main:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        R = x.shape[0]
        if self.blocks is None or R > self.MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        xe = x.expand(self.blocks.shape[0], R, x.shape[1])
        if self.block_bias is None:
            y = torch.bmm(xe, self.blocks)
        else:
            y = torch.baddbmm(self.block_bias, xe, self.blocks)
        y = y.view(R, -1) if R == 1 else y.transpose(0, 1).reshape(R, -1)
        if self.tail is not None:
            y = torch.cat((y, F.linear(x, *self.tail)), dim=1)
        return y


class Decoder:
    """One decoding step, one new token per row, written with functional ops on the model's own weights.

    ``decoder(tokens, cache, position_ids=None, attn_mask=None)`` returns the (R, V) next-token logits and equals
    ``model(tokens[:, None], kv_cache=cache, position_ids=..., attn_mask=..., last_only=True)[0][:, -1]`` (tests
    hold them together for every model kind). It exists for speed: at small sizes a decode step is dominated by
    per-op Python and dispatch cost, so it skips the module calls, dropout no-ops, transposes and copies of the
    general forward, writes each layer's key and value with one copy, and runs fp32 CPU matmuls as ``_RowsLinear``.
    ``position_ids`` (R, 1) are the positions of the fed tokens (left-padded batches; must be < block_size for
    learned positions); None means ``cache.pos`` for every row. A subclass with its own ``forward`` is decoded
    through that ``forward``. Build one per generation call: it holds views of the current weights.
    """

    def __init__(self, model: "GPT", groups: Optional[int] = None):
        self.model = model
        self.c = c = model.config
        self.generic = type(model).forward is not GPT.forward
        if self.generic:
            return
        g = gemv_groups(model.wte.weight) if groups is None else groups
        self.rms, self.shape = c.norm == "rmsnorm", [c.n_embd]

        def norm(m):
            return m.weight, getattr(m, "bias", None)

        self.layers = [
            (norm(b.ln_1), _RowsLinear(b.attn.c_attn, g), _RowsLinear(b.attn.c_proj, g), norm(b.ln_2),
             _RowsLinear(b.mlp.c_fc, g), _RowsLinear(b.mlp.c_proj, g))
            for b in model.h
        ]
        self.ln_f = norm(model.ln_f)
        self.head = _RowsLinear(model.lm_head, g)

    def _norm(self, x, wb):  # the torch.* builtins skip the Python wrappers of F.layer_norm / F.rms_norm
        if self.rms:
            return torch.rms_norm(x, self.shape, wb[0], self.c.norm_eps)
        return torch.layer_norm(x, self.shape, wb[0], wb[1], self.c.norm_eps)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, position_ids=None, attn_mask=None) -> torch.Tensor:
        if self.generic:
            logits, _ = self.model(tokens[:, None], kv_cache=cache, position_ids=position_ids, attn_mask=attn_mask,
                                   last_only=True)
            return logits[:, -1]
        c, m = self.c, self.model
        R, H, Hkv, D = tokens.shape[0], c.n_head, c.n_kv_head, c.head_dim
        p = cache.pos
        if p >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} positions)")
        x = torch.embedding(m.wte.weight, tokens)
        rope = None
        if c.pos == "learned":
            if position_ids is None:
                if p >= c.block_size:
                    raise ValueError(f"position {p} is beyond the model's context of {c.block_size} tokens")
                x = x + m.wpe.weight[p]
            else:
                x = x + F.embedding(position_ids[:, 0], m.wpe.weight)
        else:
            pos = position_ids if position_ids is not None else torch.full((R, 1), p, device=tokens.device)
            if c.pos == "sinusoidal":
                x = x + sinusoidal_embedding(pos[:, 0], c.n_embd).to(x.dtype)
            else:
                cos, sin = _rope_cos_sin(pos, D, c.rope_theta)
                rope = (cos[:, None], sin[:, None])  # (R, 1, 1, D)
        gqa, qd, kd = Hkv != H, H * D, Hkv * D
        gqa_kw = {"enable_gqa": True} if gqa and _SDPA_HAS_GQA else {}
        for i, (n1, attn_in, attn_out, n2, mlp_in, mlp_out) in enumerate(self.layers):
            qkv = attn_in(self._norm(x, n1))
            q = qkv[:, :qd].view(R, H, 1, D)
            if rope is None:  # keys and values side by side in qkv: one copy into the cache
                cache.kv[i].select(3, p).copy_(qkv[:, qd:].view(R, 2, Hkv, D).transpose(0, 1))
            else:
                q, k = _apply_rope(q, *rope), _apply_rope(qkv[:, qd : qd + kd].view(R, Hkv, 1, D), *rope)
                cache.k[i].select(2, p).copy_(k[:, :, 0])
                cache.v[i].select(2, p).copy_(qkv[:, qd + kd :].view(R, Hkv, D))
            keys, values = cache.k[i].narrow(2, 0, p + 1), cache.v[i].narrow(2, 0, p + 1)
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            if gqa and not _SDPA_HAS_GQA:
                keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, **gqa_kw)
            x = x + attn_out(y.reshape(R, qd))
            x = x + mlp_out(_activate(mlp_in(self._norm(x, n2)), c.mlp))
        cache.pos = p + 1
        return self.head(self._norm(x, self.ln_f))
