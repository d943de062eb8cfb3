"""Pieces shared by the RL stages (PPO, GRPO, DPO, the reward model): prompts, reward functions, rollouts and
per-token log-probs of replies.

    prompts.jsonl ──read_prompts──▶ [messages] ──rollout (engine.generate, sampled, log-probs)──▶ [Rollout]
    Rollout ──reward (RM or load_reward_fn/call_reward_fn)──▶ scores
    (prompt_ids, reply_ids) ──sequence_logprobs_batch──▶ per-token log-probs (policy with grad, reference without)

Every reply is scored and trained as the chat template writes it: the prompt rendered with
``chat.render(..., add_generation_prompt=True)`` (ending in ``<|assistant|>``), then the reply tokens, closed by
``<|end|>`` when the model stopped on its own.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .trainer import unwrap

ROLES = ("system", "user", "assistant")

RewardFn = Callable[[list[dict], str], float]


class RewardFunctionError(UserError):
    """A scripted reward function raised or returned something that is not a finite number."""


# ---- reward functions ------------------------------------------------------------------------------------------------


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``"module:function"`` or ``"path/to/file.py:function"``; the function gets ``(prompt_messages, reply)``.

    UserError (naming the spec) if the module cannot be imported or has no such callable.
    """
    module_name, sep, fn_name = str(spec).rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"--reward-fn: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--reward-fn: file {module_name} not found")
            mod_id = f"_pocketgpt_reward_{abs(hash(str(path.resolve())))}"
            spec_obj = importlib.util.spec_from_file_location(mod_id, str(path))
            if spec_obj is None or spec_obj.loader is None:
                raise UserError(f"--reward-fn: cannot import {module_name}")
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_id] = module
            spec_obj.loader.exec_module(module)
        else:  # an importable module; the current directory counts too (as with ``python -m``)
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added and cwd in sys.path:
                    sys.path.remove(cwd)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure of user code is a user error
        raise UserError(f"--reward-fn: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise UserError(f"--reward-fn: module {module_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise UserError(f"--reward-fn: {spec!r} is not callable")
    return fn


def _as_number(value: Any) -> Optional[float]:
    """A finite float from a Python / numpy number or a one-element tensor, else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else None
    try:  # numpy scalars register as numbers.Real, but be lenient with other 0-d array-likes
        import numpy as np

        if isinstance(value, np.ndarray) and value.size == 1:
            v = float(value.reshape(()))
            return v if math.isfinite(v) else None
    except ImportError:  # pragma: no cover
        pass
    return None


def call_reward_fn(fn: RewardFn, prompt_messages: list[dict], reply: str, *, record: str) -> float:
    """Call a scripted reward; raise ``RewardFunctionError`` naming ``record`` if it raises or returns a non-number."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        value = fn(prompt_messages, reply)
    except Exception as e:  # noqa: BLE001 - report whatever the user's function raised
        raise RewardFunctionError(f"{record}: reward function {name} raised {type(e).__name__}: {e}") from None
    v = _as_number(value)
    if v is None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise RewardFunctionError(f"{record}: reward function {name} returned {shown}, expected a finite number")
    return v


# ---- prompts -----------------------------------------------------------------------------------------------------------


def check_messages(obj: Any, where: str, *, field_name: str = "messages") -> list[dict]:
    """Validate a list of chat messages (``{"role", "content"}``); UserError ``where: ...`` otherwise."""
    if not isinstance(obj, list) or not obj:
        raise UserError(f"{where}: '{field_name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(obj):
        if not isinstance(m, dict):
            raise UserError(f"{where}: {field_name}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: {field_name}[{i}].role must be one of {', '.join(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise UserError(f"{where}: {field_name}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def resolve_file(name: str | Path) -> Path:
    """A JSONL file path, or the name of a bundled file corpus (``pocketgpt.data.builtin_path``, e.g. ``prefs``)."""
    p = Path(name)
    if p.exists():
        return p
    try:
        from ..data import BUILTINS, builtin_path
    except ImportError:
        raise UserError(f"{name}: file not found") from None
    if str(name) in BUILTINS:
        found = Path(builtin_path(str(name)))
        if found.is_file():
            return found
        raise UserError(f"{name}: this bundled corpus is a folder; give one of its files")
    raise UserError(f"{name}: file not found (nor a bundled corpus: {', '.join(BUILTINS)})")


def read_jsonl_records(path: str | Path) -> list[tuple[int, Any]]:
    """``(line_number, object)`` for each non-blank line of a JSONL file (``.gz`` allowed); UserError on bad JSON."""
    import gzip

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a JSONL file")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return records


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Read RL prompts from JSONL: ``{"messages": [...]}``, ``{"prompt": [...]}`` or ``{"prompt": "text"}``.

    A conversation that ends with an assistant turn (e.g. an SFT file) is used up to its last user turn.
    """
    prompts, _ = read_prompts_with_lines(path)
    return prompts


def read_prompts_with_lines(path: str | Path) -> tuple[list[list[dict]], list[int]]:
    """Like ``read_prompts`` but also returns each prompt's line number (for error messages naming the record)."""
    path = Path(path)
    prompts, lines = [], []
    for lineno, obj in read_jsonl_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with 'messages' or 'prompt'")
        if "messages" in obj:
            msgs = check_messages(obj["messages"], where, field_name="messages")
        elif "prompt" in obj:
            p = obj["prompt"]
            if isinstance(p, str):
                if not p.strip():
                    raise UserError(f"{where}: 'prompt' is empty")
                msgs = [{"role": "user", "content": p}]
            else:
                msgs = check_messages(p, where, field_name="prompt")
        else:
            raise UserError(f"{where}: expected a 'messages' list or a 'prompt' (list of messages or text)")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise UserError(f"{where}: the prompt must end with a user message")
        prompts.append(msgs)
        lines.append(lineno)
    if not prompts:
        raise UserError(f"{path}: no prompts in this file")
    return prompts, lines


# ---- rollouts ----------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled reply. ``reply_ids`` includes the closing ``<|end|>`` when the model stopped on its own."""

    prompt_ids: list[int]
    reply_ids: list[int]
    logprobs: list[float]  # log-prob of each reply token under the sampling policy (len == len(reply_ids))
    text: str  # the reply text, without <|end|>
    finish_reason: str  # "stop" | "length"
    prompt_index: int = 0  # which prompt of the batch it answers
    extra: dict = field(default_factory=dict)


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Prompt ids as the chat template writes them, ending in ``<|assistant|>``."""
    from ..chat import render

    ids, _ = render(messages, tokenizer, add_generation_prompt=True)
    return list(ids)


def _fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep the last ``limit`` tokens (the newest turns) of an over-long prompt."""
    return ids if len(ids) <= limit else ids[len(ids) - limit:]


@torch.no_grad()
def rollout(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    recompute_logprobs: bool = True,
    logprob_batch_size: int = 32,
) -> list[Rollout]:
    """Sample ``n`` replies per prompt through the engine (prompt-major order), with their log-probs.

    ``temperature=0`` is greedy. The engine drops the stop token; here a reply that stopped keeps its closing
    ``<|end|>`` in ``reply_ids`` (``text`` excludes it). ``logprobs`` are the raw-policy (temperature 1) log-probs
    of every reply token, recomputed in one padded forward (``recompute_logprobs=False``: the engine's, with NaN
    for the closing ``<|end|>``).
    """
    from ..engine import generate

    end_id = tokenizer.token_id("<|end|>")
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block - 8))
    prompt_ids = [_fit_prompt(render_prompt(m, tokenizer), block - max_new_tokens) for m in prompts]
    was_training = model.training
    model.eval()
    try:
        results = generate(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, n=n, stop_ids=[end_id], seed=seed, return_logprobs=True)
    finally:
        model.train(was_training)
    out = []
    for row, res in enumerate(results):
        tokens = [int(t) for t in res.tokens]
        reason = res.finish_reason or "length"
        if end_id in tokens:  # an engine that keeps the stop token: cut there
            tokens = tokens[: tokens.index(end_id)]
            reason = "stop"
        text = tokenizer.decode(tokens)
        if reason == "stop":  # the engine drops the stop token; it is part of what the policy wrote
            tokens = tokens + [end_id]
        out.append(Rollout(prompt_ids=prompt_ids[row // n], reply_ids=tokens, logprobs=[], text=text,
                           finish_reason=reason, prompt_index=row // n))
    # log-probs of every reply token (the closing <|end|> included) from one padded forward of the same model,
    # so that they match what a training forward computes exactly
    if recompute_logprobs:
        model.eval()
        try:
            for i in range(0, len(out), logprob_batch_size):
                chunk = out[i: i + logprob_batch_size]
                logp, _ = sequence_logprobs_batch(model, [r.prompt_ids for r in chunk], [r.reply_ids for r in chunk])
                for r, row in zip(chunk, logp.tolist()):
                    r.logprobs = row[: len(r.reply_ids)]
        finally:
            model.train(was_training)
    else:
        for r, res in zip(out, results):
            lp = [float(x) for x in (res.logprobs or [])][: len(r.reply_ids)]
            r.logprobs = lp + [float("nan")] * (len(r.reply_ids) - len(lp))
    return out


# ---- per-token log-probs -------------------------------------------------------------------------------------------------


def pack_prompt_reply(prompt_ids: list[list[int]], reply_ids: list[list[int]], pad_id: int = 0,
                      device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + reply`` rows for one forward pass.

    Returns ``idx`` (B, L) int64, ``pos`` (B, T) the positions whose logits predict reply token t (``p_len - 1 + t``)
    and ``mask`` (B, T) bool (True = a real reply token); T is the longest reply (at least 1).
    """
    B = len(prompt_ids)
    T = max(1, max((len(r) for r in reply_ids), default=1))
    L = max(1, max(len(p) + len(r) for p, r in zip(prompt_ids, reply_ids)))
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, reply_ids)):
        row = list(p) + list(r)
        idx[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        n = len(r)
        pos[b, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        pos[b, n:] = max(0, len(p) - 1)
        mask[b, :n] = True
    if device is not None:
        idx, pos, mask = idx.to(device), pos.to(device), mask.to(device)
    return idx, pos, mask


def reply_logprobs(model: nn.Module, idx: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor,
                   mask: torch.Tensor, *, return_entropy: bool = False, return_hidden: bool = False):
    """Log-probs of ``targets`` read at positions ``pos`` of one forward over ``idx`` (see ``pack_prompt_reply``).

    ``model`` is a GPT (``model(idx, return_hidden=True)`` + ``model.lm_head``). Returns ``(logp, entropy, hidden)``
    where entropy / hidden are None unless asked for; masked positions hold 0.
    """
    hidden, _ = model(idx, return_hidden=True)  # (B, L, C)
    h = torch.gather(hidden, 1, pos.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))  # (B, T, C)
    logits = unwrap(model).lm_head(h).float()  # the head only on the T reply positions (B, T, V)
    logp_all = F.log_softmax(logits, dim=-1)
    m = mask.to(logp_all.dtype)
    logp = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1) * m
    ent = -(logp_all.exp() * logp_all).sum(-1) * m if return_entropy else None
    return logp, ent, (h if return_hidden else None)


def reply_targets(reply_ids: list[list[int]], T: Optional[int] = None) -> torch.Tensor:
    """(B, T) int64 of the reply tokens, right-padded with 0."""
    T = T or max(1, max((len(r) for r in reply_ids), default=1))
    out = torch.zeros((len(reply_ids), T), dtype=torch.long)
    for b, r in enumerate(reply_ids):
        if r:
            out[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def sequence_logprobs_batch(model: nn.Module, prompt_ids: list[list[int]], reply_ids: list[list[int]], *,
                            return_entropy: bool = False, return_hidden: bool = False):
    """Per-token log-probs of each reply given its prompt, in one padded forward (with grad if enabled).

    Returns ``(logp, mask)`` of shape (B, T_reply_max) — padded positions hold 0 and ``mask`` False.
    ``return_entropy`` adds the per-token entropy of the policy (B, T); ``return_hidden`` adds the final hidden
    states at the same positions (B, T, C), e.g. for a value head: ``(logp, mask, entropy?, hidden?)``.
    """
    device = next(model.parameters()).device
    idx, pos, mask = pack_prompt_reply(prompt_ids, reply_ids, device=device)
    targets = reply_targets(reply_ids, pos.size(1)).to(device)
    logp, ent, h = reply_logprobs(model, idx, pos, targets, mask, return_entropy=return_entropy,
                                  return_hidden=return_hidden)
    out: list = [logp, mask]
    if return_entropy:
        out.append(ent)
    if return_hidden:
        out.append(h)
    return tuple(out)


def frozen_copy(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A reference model: a deep copy in eval mode with every parameter frozen (optionally cast, e.g. bf16)."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref = ref.to(dtype)
    return freeze(ref)


def freeze(model: nn.Module) -> nn.Module:
    """eval() and requires_grad False on every parameter, in place; returns the model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is True (0 when none)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: Optional[torch.Tensor] = None, shift_mean: bool = True, eps: float = 1e-8):
    """Normalise to unit variance (and zero mean unless ``shift_mean=False``) over the masked entries."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)
