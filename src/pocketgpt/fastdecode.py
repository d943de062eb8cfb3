"""The engine's one-token decoding step: on a CPU, ``Decoder`` (``GPT.forward`` in functional ops, fp32 matmuls as one
``bmm`` over row blocks: a small model's step is dispatch cost and MKL's gemv uses one core), else the model's own."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import adapted
from .model import GPT, KVCache, activate, apply_rope, rope_cos_sin, sinusoidal_embedding

_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa=


def applies(model) -> bool:
    """Whether ``Decoder`` computes this model's forward: a plain GPT's, on a CPU, without unmerged LoRA adapters (the
    Decoder reads the base weights)."""
    return type(model).forward is GPT.forward and model.wte.weight.device.type == "cpu" and not adapted(model)


def step_fn(model):
    """One new token per row → its (R, V) logits: ``Decoder(model)`` where it applies, else the model's forward."""
    if applies(model):
        return Decoder(model)

    def step(tokens, cache, position_ids=None, attn_mask=None):
        logits, _ = model(tokens[:, None], kv_cache=cache, position_ids=position_ids, attn_mask=attn_mask,
                          last_only=True)
        return logits[:, -1]

    return step


class RowsLinear:
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
            self.block_bias = None if bias is None else bias[:main].view(groups, 1, main // groups)
            if main < N:
                self.tail = (weight[main:], None if bias is None else bias[main:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        R = x.shape[0]
        if self.blocks is None or R > self.MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        xe = x.expand(self.blocks.shape[0], R, x.shape[1])
        y = torch.bmm(xe, self.blocks) if self.block_bias is None else torch.baddbmm(self.block_bias, xe, self.blocks)
        y = y.view(R, -1) if R == 1 else y.transpose(0, 1).reshape(R, -1)
        return y if self.tail is None else torch.cat((y, F.linear(x, *self.tail)), dim=1)


class Decoder:
    """``decoder(tokens (R,), cache, position_ids (R, 1) or None, attn_mask)`` → the (R, V) next-token logits, equal
    to the model's ``forward(tokens[:, None], ..., last_only=True)`` (tests hold them together for every model kind).
    Build one per generation call: it holds views of the current weights."""

    def __init__(self, model: GPT, groups: Optional[int] = None):
        self.model = model
        self.c = c = model.config
        g = groups
        if g is None:  # fp32: one bmm over blocks lets every core stream its own; bf16/fp16 (oneDNN): F.linear
            threads = torch.get_num_threads()
            g = 2 * threads if model.wte.weight.dtype == torch.float32 and threads > 1 else 1
        self.rms, self.shape = c.norm == "rmsnorm", [c.n_embd]

        def norm(m):
            return m.weight, getattr(m, "bias", None)

        self.layers = [(norm(b.ln_1), RowsLinear(b.attn.c_attn, g), RowsLinear(b.attn.c_proj, g), norm(b.ln_2),
                        RowsLinear(b.mlp.c_fc, g), RowsLinear(b.mlp.c_proj, g)) for b in model.h]
        self.ln_f = norm(model.ln_f)
        self.head = RowsLinear(model.lm_head, g)

    def _norm(self, x, wb):  # the torch.* builtins skip the Python wrappers of F.layer_norm / F.rms_norm
        if self.rms:
            return torch.rms_norm(x, self.shape, wb[0], self.c.norm_eps)
        return torch.layer_norm(x, self.shape, wb[0], wb[1], self.c.norm_eps)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, position_ids=None, attn_mask=None) -> torch.Tensor:
        c, m = self.c, self.model
        R, H, Hkv, D = tokens.shape[0], c.n_head, c.n_kv_head, c.head_dim
        p = cache.pos  # the engine keeps p inside the cache and the context (past either, indexing fails)
        x = torch.embedding(m.wte.weight, tokens)
        rope = None
        if c.pos == "learned":
            x = x + (m.wpe.weight[p] if position_ids is None else F.embedding(position_ids[:, 0], m.wpe.weight))
        else:
            pos = position_ids if position_ids is not None else torch.full((R, 1), p, device=tokens.device)
            if c.pos == "sinusoidal":
                x = x + sinusoidal_embedding(pos[:, 0], c.n_embd).to(x.dtype)
            else:
                rope = tuple(t[:, None] for t in rope_cos_sin(pos, D, c.rope_theta))  # (R, 1, 1, D)
        gqa, qd, kd = Hkv != H, H * D, Hkv * D
        gqa_kw = {"enable_gqa": True} if gqa and _SDPA_HAS_GQA else {}
        for i, (n1, attn_in, attn_out, n2, mlp_in, mlp_out) in enumerate(self.layers):
            qkv = attn_in(self._norm(x, n1))
            q = qkv[:, :qd].view(R, H, 1, D)
            if rope is None:  # keys and values side by side in qkv: one copy into the cache
                cache.kv[i].select(3, p).copy_(qkv[:, qd:].view(R, 2, Hkv, D).transpose(0, 1))
            else:
                q, k = apply_rope(q, *rope), apply_rope(qkv[:, qd : qd + kd].view(R, Hkv, 1, D), *rope)
                cache.k[i].select(2, p).copy_(k[:, :, 0])
                cache.v[i].select(2, p).copy_(qkv[:, qd + kd :].view(R, Hkv, D))
            keys, values = cache.k[i].narrow(2, 0, p + 1), cache.v[i].narrow(2, 0, p + 1)
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            if gqa and not _SDPA_HAS_GQA:
                keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, **gqa_kw)
            x = x + attn_out(y.reshape(R, qd))
            x = x + mlp_out(activate(mlp_in(self._norm(x, n2)), c.mlp))
        cache.pos = p + 1
        return self.head(self._norm(x, self.ln_f))
