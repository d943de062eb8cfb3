"""The generation engine: one prefill, then one token per row per step over the KV cache (``generate``, beam search,
``DecodeBatch`` under the server), and the one log-prob function (``token_logprobs``). Rules: docs/internals.md."""

from __future__ import annotations

import bisect
import codecs
import copy
import logging
import math
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import fastdecode
from .errors import UserError
from .records import fit, pad

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """New tokens (stop ids and strings excluded), their log-probs under the raw model (temperature 1, no filters),
    ``"stop"`` or ``"length"``, and the text (cut exactly before a stop string) when a tokenizer was given."""

    tokens: list[int]
    logprobs: Optional[list[float]]
    finish_reason: str
    text: Optional[str] = None


# ---- logits filters ------------------------------------------------------------------------------------------------
# Removed entries become -inf (as transformers' warpers); one value or one per row ((R,): requests share a step).


def top_k_filter(logits: torch.Tensor, k) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (and ties with the k-th); 0 keeps all."""
    k = torch.as_tensor(k, device=logits.device).expand(logits.shape[:-1])
    top = max(min(int(k.max()), logits.size(-1)), 1)
    kth = torch.topk(logits, top, dim=-1).values.gather(-1, (k.clamp(1, top) - 1).unsqueeze(-1))
    kth = kth.masked_fill((k == 0).unsqueeze(-1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability mass reaches ``p`` (at least one); 1 keeps all."""
    p = torch.as_tensor(p, device=logits.device)
    p = p.masked_fill(p >= 1.0, float("inf")).unsqueeze(-1)  # a row at 1 keeps even what rounding puts past 1
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    remove = probs.cumsum(dim=-1) - probs >= p  # the mass ranked strictly above a token reaches p
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Keep the tokens at least ``min_p`` times as likely as the most likely one; 0 keeps all."""
    probs = logits.softmax(dim=-1)
    threshold = torch.as_tensor(min_p, device=logits.device).unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---- log-probs of given tokens -------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False):
    """``(log p(target), entropy per position if entropy else None)`` under softmax(logits / temperature), float32:
    the one formula behind every log-prob (sampling, PPO/GRPO ratios and KL, DPO); dividing by the sampling
    temperature (as TRL does) makes the ratios and KL those of the distribution the replies were sampled from."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)


def pack_replies(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], pad_id: int = 0, device=None):
    """Right-padded ``prompt + reply`` rows for one forward → ``(idx (B, L), pos (B, T), targets (B, T), mask (B, T))``:
    ``pos[b, t]`` predicts reply token t, ``mask`` marks real reply tokens (right pads are never attended to)."""
    for b, p in enumerate(prompts):
        if not p:
            raise UserError(f"score: row {b} has an empty prompt (the first token has no log-prob)")
    idx = pad([list(p) + list(r) for p, r in zip(prompts, replies)], pad_id)
    targets = pad(replies, 0)
    mask = pad([[1] * len(r) for r in replies], 0, targets.size(1)).bool()
    pos = torch.tensor([[len(p) - 1] for p in prompts], dtype=torch.long) + torch.arange(targets.size(1)) * mask
    return tuple(t.to(device) for t in (idx, pos, targets, mask))


def token_logprobs(model, idx: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                   temperature: float = 1.0, entropy: bool = False, hidden: bool = False, return_argmax: bool = False):
    """``(logp, entropy or None, hidden or None)`` — (B, T), (B, T), (B, T, C), 0 where ``mask`` is False — of
    ``pack_replies`` rows: one differentiable forward of ``model`` (a GPT or a DDP / compiled wrapper), the lm_head
    on the reply positions only. ``return_argmax``: and the most likely token at each position (B, T)."""
    logits, h = model(idx, at=pos)
    logp, ent = logprobs_from_logits(logits, targets, temperature, entropy=entropy)
    m = mask.to(logp.dtype)
    out = logp * m, (ent * m if entropy else None), (h if hidden else None)
    return (*out, logits.argmax(-1)) if return_argmax else out


# ---- valid UTF-8 by construction: which tokens may follow each state of a partial character ------------------------
# A state: (continuation bytes pending, allowed range of the next byte); the byte after E0, ED, F0 and F4 has a
# narrower range than 80-BF (no overlong forms, no surrogates, nothing above U+10FFFF).
_STATES = [(0, 0, 255), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (3, 0x80, 0xBF),
           (2, 0xA0, 0xBF), (2, 0x80, 0x9F), (3, 0x90, 0xBF), (3, 0x80, 0x8F)]
_FIRST_RANGE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _utf8_after(b: bytes, need: int, lo: int, hi: int):
    """The state after appending ``b`` to state ``(need, lo, hi)``, or None when ``b`` cannot follow it (a stray
    continuation byte, a character cut short, C0/C1/F5-FF)."""
    for c in b:
        if need:
            if not lo <= c <= hi:
                return None
            need, lo, hi = need - 1, 0x80, 0xBF
        elif 0xC2 <= c <= 0xF4:
            need = 1 if c < 0xE0 else 2 if c < 0xF0 else 3
            lo, hi = _FIRST_RANGE.get(c, (0x80, 0xBF))
        elif c >= 0x80:
            return None
    return (need, lo, hi) if need else _STATES[0]


class _TokenText:
    """A tokenizer's bytes per token (``.bytes[id]``) and, where a token can hold part of a character (byte-level
    BPE), ``blocked[s, t]``: token t cannot come in state s (ids past the tokenizer never can), and ``next[s, t]``;
    ``blocked`` is None otherwise. Built once per (tokenizer, vocabulary, device): a step's mask is one gather."""

    def __init__(self, tokenizer, V: int, device):
        n_tok = tokenizer.vocab_size
        self.bytes = [bytes(tokenizer.decode_bytes([i])) if i < n_tok else b"" for i in range(V)]
        self.blocked = None
        allowed, nxt = [[False] * V for _ in _STATES], [[0] * V for _ in _STATES]
        for t, b in enumerate(self.bytes[:n_tok]):
            for s, state in enumerate(_STATES):
                after = _utf8_after(b, *state) if b or s == 0 else None  # an empty token cannot end a character
                if after is not None:
                    allowed[s][t], nxt[s][t] = True, _STATES.index(after)
        if n_tok >= V and all(allowed[0]) and not any(nxt[0]):
            return  # every token is whole characters: nothing to mask
        for row in allowed:
            if not any(row):  # a vocabulary lacking every byte this state needs: leave such rows unmasked
                row[:] = [True] * V
        self.blocked = ~torch.tensor(allowed, dtype=torch.bool, device=device)
        self.next = torch.tensor(nxt, dtype=torch.long, device=device)

    @staticmethod
    def of(tokenizer, V: int, device) -> "_TokenText":
        per = _TABLES.setdefault(tokenizer, {})
        key = (V, tokenizer.vocab_size, str(device))
        if key not in per:
            per[key] = _TokenText(tokenizer, V, device)
        return per[key]


class _Utf8Mask:
    """The UTF-8 states of R rows: ``mask(logits)`` sets what cannot come next to -inf, ``update`` feeds the chosen
    tokens, ``reorder`` follows beams."""

    def __init__(self, table: _TokenText, R: int):
        self.t = table
        self.state = torch.zeros(R, dtype=torch.long, device=table.next.device)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(self.t.blocked[self.state], float("-inf"))

    def update(self, tokens: torch.Tensor) -> None:
        self.state = self.t.next[self.state, tokens]

    def reorder(self, index: torch.Tensor) -> None:
        self.state = self.state[index]


def _utf8_mask(text: Optional[_TokenText], R: int) -> Optional[_Utf8Mask]:
    return _Utf8Mask(text, R) if text is not None and text.blocked is not None else None


class _Row:
    """Decoding state of one output row."""

    def __init__(self, limit: int, with_text: bool):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done, self.reason = limit <= 0, "length"  # a row that may produce nothing is done at once
        self.limit = limit  # how many new tokens this row may produce (max_new_tokens, the context)
        self.text = "" if with_text else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if with_text else None
        self.byte_ends: list[int] = []  # cumulative byte length after each token (to cut at a stop string)
        self.scan_from = 0

    def add(self, t: int, logprob: Optional[float], text: Optional[_TokenText], stops: tuple[str, ...]) -> None:
        """Append token ``t`` (and its text with a tokenizer); finish the row at a stop string or its limit."""
        self.tokens.append(t)
        if logprob is not None:
            self.logprobs.append(logprob)
        if text is not None:
            b = text.bytes[t]
            self.byte_ends.append((self.byte_ends[-1] if self.byte_ends else 0) + len(b))
            self.text += self.decoder.decode(b)
            if stops and self._cut_at_stop(stops):
                return
        if len(self.tokens) >= self.limit:
            self.finish("length")

    def _cut_at_stop(self, stops: tuple[str, ...]) -> bool:
        """If a stop string appeared in the text, cut text and tokens exactly before it and finish the row."""
        start = max(0, self.scan_from - max(len(s) for s in stops) + 1)
        found = min((j for j in (self.text.find(s, start) for s in stops) if j != -1), default=-1)
        self.scan_from = len(self.text)
        if found == -1:
            return False
        self.text = self.text[:found]
        keep = bisect.bisect_right(self.byte_ends, len(self.text.encode("utf-8", errors="surrogatepass")))
        del self.tokens[keep:], self.byte_ends[keep:], self.logprobs[keep:]
        self.finish("stop")
        return True

    def finish(self, reason: str) -> None:
        # no final flush of the decoder: a character cut by the length limit is left out, never shown as U+FFFD
        self.done, self.reason = True, reason


@dataclass
class SamplingParams:
    """Every option of one generation call (docs/internals.md, "Engine"), checked on creation (a ``UserError`` naming
    the field) and normalised (``top_k`` 0 and ``top_p`` 1 are off; ``stop_ids`` / ``stop``: one, a list or None)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    no_repeat_ngram_size: int = 0
    n: int = 1
    stop_ids: Union[int, Sequence[int], None] = ()
    stop: Union[str, Sequence[str], None] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"{name}: must be {rule}, got {getattr(self, name)!r}")

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        t = self.temperature
        check(count(self.max_new_tokens), "max_new_tokens", "a non-negative integer")
        check(t is not None and math.isfinite(t) and t >= 0, "temperature", ">= 0 (0 = greedy)")
        check(self.top_k is None or (int(self.top_k) == self.top_k and self.top_k >= 0), "top_k",
              "a positive integer (or 0/None for off)")
        check(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        check(self.min_p is None or 0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]")
        check(self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 = off)")
        check(count(self.num_beams) and self.num_beams >= 1, "num_beams", "a positive integer")
        check(count(self.n) and self.n >= 1, "n", "a positive integer")
        check(count(self.no_repeat_ngram_size), "no_repeat_ngram_size", "a non-negative integer (0 = off)")
        check(self.num_beams == 1 or self.n <= self.num_beams, "n", f"<= num_beams ({self.num_beams}) in beam search")
        self.temperature = float(t)
        self.top_k = int(self.top_k) if self.top_k else None
        self.top_p = float(self.top_p) if self.top_p is not None and self.top_p < 1.0 else None
        self.min_p = float(self.min_p) if self.min_p else None
        self.repetition_penalty = float(self.repetition_penalty)
        self.presence_penalty = float(self.presence_penalty or 0.0)
        self.frequency_penalty = float(self.frequency_penalty or 0.0)
        ids = self.stop_ids if self.stop_ids is not None else ()
        self.stop_ids = tuple(sorted({int(i) for i in ([ids] if isinstance(ids, int) else ids)}))
        stop = self.stop if self.stop is not None else ()
        self.stop = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def _checked_prompts(model, prompts, max_new_tokens: int) -> list[list[int]]:
    """``prompts`` as int lists, checked (a ``UserError`` naming the prompt); one longer than the context is cut by
    ``records.fit`` (keeping room to answer), with a warning."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError("generate: prompts must be a non-empty list of token-id lists")
    V, ctx = model.config.vocab_size, model.config.block_size
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (int, str)) or not hasattr(p, "__len__"):
            raise UserError(f"generate: prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise UserError(f"generate: prompt {i} is empty (give at least one token, e.g. <|endoftext|>)")
        bad = [t for t in p if not (0 <= int(t) < V)]
        if bad:
            raise UserError(f"generate: prompt {i}: token id {bad[0]} is outside the vocabulary (size {V})")
        out.append([int(t) for t in p])
        if len(p) > ctx:
            out[i], _ = fit(out[i], ctx, min(max_new_tokens, ctx // 2))
            msg = (f"prompt {i} has {len(p)} tokens, more than the model's context of {ctx}: "
                   f"keeping its last {len(out[i])} tokens")
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)
    return out


def _row_limit(model, prompt_len: int, max_new_tokens: int) -> int:
    """New tokens a row may produce: learned positions stop at the context (the last token needs no position)."""
    learned = model.config.pos == "learned"
    return min(max_new_tokens, model.config.block_size - prompt_len + 1) if learned else max_new_tokens


# ---- the decoding loop (greedy / sampling, batched, n per prompt, rows joining and leaving) ------------------------


class _Sampler:
    """One step's logits (R, V) → tokens, per-row options in one (R, 7) tensor (each filter runs once for all rows).
    A seeded ``add``'s rows share a generator drawing for all of them, so the rest of the batch never changes them."""

    def __init__(self, V: int, device, utf8: Optional[_Utf8Mask] = None):
        self.V, self.device, self.utf8 = V, device, utf8
        self.params: list[SamplingParams] = []
        self.opts = torch.empty(0, 7, device=device)  # temperature, top_k, top_p, min_p, repetition, presence, freq.
        self.seen = self.counts = None  # (R, V): prompt + output tokens (repetition), output counts (presence/freq.)
        self.draws: list = []  # per row: (generator, rows drawn, this row's index in the draw) or None

    def add(self, prompts, p: SamplingParams) -> None:
        n, R0, R, V, dev = p.n, len(self.params), len(prompts) * p.n, self.V, self.device
        row = [p.temperature, p.top_k or 0, 2.0 if p.top_p is None else p.top_p, p.min_p or 0.0,
               p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
        self.opts = torch.cat([self.opts, torch.tensor([row], device=dev).expand(R, -1)])
        self.params += [p] * R
        if p.repetition_penalty != 1.0 or self.seen is not None:  # rows without the penalty ignore theirs
            seen = torch.zeros(R, V, dtype=torch.bool, device=dev)
            for i, ids in enumerate(prompts):
                seen[i * n : (i + 1) * n, torch.tensor(sorted(set(ids)), device=dev)] = True
            old = self.seen if self.seen is not None else torch.zeros(R0, V, dtype=torch.bool, device=dev)
            self.seen = torch.cat([old, seen])
        if p.presence_penalty or p.frequency_penalty or self.counts is not None:
            old = self.counts if self.counts is not None else torch.zeros(R0, V, device=dev)
            self.counts = torch.cat([old, torch.zeros(R, V, device=dev)])
        g = torch.Generator(device=dev).manual_seed(int(p.seed)) if p.seed is not None and p.temperature > 0 else None
        self.draws += [None if g is None else (g, R, i) for i in range(R)]
        if self.utf8 is not None:
            self.utf8.state = torch.cat([self.utf8.state, torch.zeros(R, dtype=torch.long, device=dev)])
        self._plan()

    def keep(self, order: list[int]) -> None:
        """Row ``i`` becomes old row ``order[i]`` (rows not named leave)."""
        idx = torch.tensor(order, dtype=torch.long, device=self.device)
        self.params = [self.params[i] for i in order]
        self.draws = [self.draws[i] for i in order]
        self.opts = self.opts[idx]
        self.seen = None if self.seen is None else self.seen[idx]
        self.counts = None if self.counts is None else self.counts[idx]
        if self.utf8 is not None:
            self.utf8.reorder(idx)
        self._plan()

    def _plan(self) -> None:
        """What this set of rows needs each step (Python flags: no work for options no row uses)."""
        ps = self.params
        sampled = [p for p in ps if p.temperature > 0]
        self.greedy = None if len(sampled) == len(ps) else self.opts[:, 0] == 0
        self.top_k = any(p.top_k for p in sampled)
        self.top_p = any(p.top_p is not None for p in sampled)
        self.min_p = any(p.min_p for p in sampled)
        if not any(p.repetition_penalty != 1.0 for p in ps):
            self.seen = None
        if not any(p.presence_penalty or p.frequency_penalty for p in ps):
            self.counts = None
        groups: dict = {}  # (generator, rows it draws) -> [(row, its index in the draw)]
        for r, d in enumerate(self.draws):
            if d is not None:
                groups.setdefault(d[:2], []).append((r, d[2]))
        self.groups = [(g, size, *torch.tensor(pairs, device=self.device).T) for (g, size), pairs in groups.items()]
        self.unseeded = any(d is None for d in self.draws)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if self.utf8 is not None:
            logits = self.utf8.mask(logits)
        if self.seen is not None:
            rep = o[:, 4:5]
            logits = torch.where(self.seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
        if self.counts is not None:
            logits = logits - o[:, 6:7] * self.counts - o[:, 5:6] * (self.counts > 0).float()
        if self.greedy is not None and bool(self.greedy.all()):
            return logits.argmax(dim=-1)
        best = None if self.greedy is None else logits.argmax(dim=-1)
        logits = logits / (o[:, 0:1] if self.greedy is None else o[:, 0:1].masked_fill(self.greedy[:, None], 1.0))
        if self.top_k:
            logits = top_k_filter(logits, o[:, 1].long())
        if self.top_p:
            logits = top_p_filter(logits, o[:, 2])
        if self.min_p:
            logits = min_p_filter(logits, o[:, 3])
        # one draw per row by an exponential race: argmax(p_i / E_i), E_i ~ Exp(1), picks i with probability p_i
        # (the trick torch.multinomial uses inside, minus its input checks and extra passes over the row)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs)
        if self.unseeded:
            race.exponential_()
        for g, size, rows, at in self.groups:
            race[rows] = probs.new_empty(size, probs.shape[1]).exponential_(generator=g)[at]
        tokens = probs.div_(race.clamp_min_(1e-30)).argmax(dim=-1)  # never 0/0
        return tokens if best is None else torch.where(self.greedy, best, tokens)

    def update(self, tokens: torch.Tensor) -> None:
        if self.utf8 is not None:
            self.utf8.update(tokens)
        idx = tokens.unsqueeze(1)
        if self.seen is not None:
            self.seen.scatter_(1, idx, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))


class DecodeBatch:
    """Rows decoding together over one KV cache, joining (``add``) and leaving (finished, ``drop``) between steps;
    every row writes at column ``pos``, row r's keys are ``[start_r, pos]`` (the rest masked). Under inference mode."""

    def __init__(self, model, tokenizer=None, want_logprobs: bool = False):
        self.model, self.want_logprobs = model, want_logprobs
        self.device = model.wte.weight.device
        self.text = None if tokenizer is None else _TokenText.of(tokenizer, model.config.vocab_size, self.device)
        self.sampler = _Sampler(model.config.vocab_size, self.device, _utf8_mask(self.text, 0))
        self.step_fn = fastdecode.step_fn(model)
        self.rows: list[_Row] = []
        self.cache = None  # KVCache (2, capacity rows, Hkv, capacity columns, D); rows [0, R) are live
        self.view = None  # the KVCache of rows [0, R) the forward writes into
        self.pos = 0
        self.start = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logits = None  # (R, V): the next-token logits of every row

    def add(self, prompts: list[list[int]], p: Union[SamplingParams, list[SamplingParams]]) -> list[_Row]:
        """Prefill ``prompts`` (one forward) and join their rows (prompt-major, ``n`` each); returns them. ``p`` is
        one ``SamplingParams`` for all (with a seed: one generator for all their rows, as ``generate``) or one per
        prompt (separate requests: each its own generator)."""
        model, ps = self.model, p if isinstance(p, list) else [p] * len(prompts)
        rows = [_Row(_row_limit(model, len(ids), q.max_new_tokens), self.text is not None)
                for ids, q in zip(prompts, ps) for _ in range(q.n)]
        if all(r.done for r in rows):
            return rows
        P = max(len(ids) for ids in prompts)
        pads = torch.tensor([P - len(ids) for ids in prompts], device=self.device)
        idx = torch.tensor([[0] * (P - len(ids)) + ids for ids in prompts], dtype=torch.long, device=self.device)
        cache = model.new_kv_cache(len(prompts), max_len=P)
        kw = {}
        if bool(pads.any()):  # left padding: positions start at each prompt, pads are never attended to
            ar = torch.arange(P, device=self.device)
            mask = ((ar[:, None] >= ar) & (ar >= pads[:, None, None])) | (ar[:, None] == ar)  # a pad sees itself
            kw = dict(position_ids=(ar - pads[:, None]).clamp_min(0), attn_mask=mask[:, None])
        logits, _ = model(idx, kv_cache=cache, last_only=True, **kw)
        # the prompts' keys/values go to columns [pos - P, pos) of new rows (n copies each)
        R, new = len(self.rows), len(rows)
        if R == 0:
            self.pos = 0
        self._room(P, max(r.limit for r in rows), R + new)
        if P > self.pos:
            self._move(0, P - self.pos)
        src = torch.tensor([i for i, q in enumerate(ps) for _ in range(q.n)], device=self.device)
        for big, t in zip(self.cache.kv, cache.kv):
            big[:, R : R + new, :, self.pos - P : self.pos] = t.index_select(1, src)
        self.start = torch.cat([self.start, self.pos - P + pads[src]])
        last = logits[:, -1].index_select(0, src)
        self.logits = last if self.logits is None or R == 0 else torch.cat([self.logits, last])
        for ids, q in (zip(([x] for x in prompts), p) if isinstance(p, list) else [(prompts, p)]):
            self.sampler.add(ids, q)
        self.rows += rows
        self.view = None
        return rows

    def step(self) -> None:
        """One token for every row; finished rows leave; the others are fed (their next logits computed)."""
        if not self.rows:
            return
        logits = self.logits.float()
        tokens = self.sampler(logits)
        self.sampler.update(tokens)
        lps = logprobs_from_logits(logits, tokens)[0].tolist() if self.want_logprobs else None
        for i, (r, p, t) in enumerate(zip(self.rows, self.sampler.params, tokens.tolist())):
            if t in p.stop_ids:
                r.finish("stop")
            else:
                r.add(t, lps[i] if lps else None, self.text, p.stop)
        if any(r.done for r in self.rows):
            tokens = tokens[self._compact()]
        if self.rows:
            self.logits = self._forward(tokens)

    def drop(self, rows: Sequence[_Row]) -> None:
        for r in rows:
            if not r.done:
                r.finish("cancelled")
        self._compact()

    def _compact(self) -> torch.Tensor:
        """Drop the finished rows: the last live rows move into their slots. Returns the old index of each row."""
        rows = self.rows
        live = sum(not r.done for r in rows)
        holes = [i for i in range(live) if rows[i].done]
        movers = [i for i in range(live, len(rows)) if not rows[i].done]
        order = list(range(live))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            h_t, m_t = (torch.tensor(x, device=self.device) for x in (holes, movers))
            for t in self.cache.kv:
                filled = t[:, :, :, : self.pos]
                filled.index_copy_(1, h_t, filled.index_select(1, m_t))
        idx = torch.tensor(order, dtype=torch.long, device=self.device)
        self.rows = [rows[i] for i in order]
        self.start = self.start[idx]
        self.logits = None if self.logits is None else self.logits[idx]
        self.sampler.keep(order)
        self.view = None
        if not self.rows:  # an idle server holds no cache
            self.cache = self.logits = None
        return idx

    def _room(self, first: int, span: int, rows: int) -> None:
        """Make the cache hold ``rows`` rows and ``max(pos, first) + span`` columns: first drop the columns no row
        uses any more, then grow (doubling)."""
        if self.cache is not None and max(self.pos, first) + span > self.cache.max_len and self.rows:
            unused = int(self.start.min())
            if unused:
                self._move(unused, -unused)
        cols = max(self.pos, first) + span
        R0, L0 = (0, 0) if self.cache is None else (self.cache.kv[0].shape[1], self.cache.max_len)
        if rows <= R0 and cols <= L0:
            return
        old = self.cache
        self.cache = self.model.new_kv_cache(R0 if rows <= R0 else max(rows, 2 * R0),
                                             max_len=L0 if cols <= L0 else max(cols, 2 * L0))
        if old is not None and self.rows:
            for t, o in zip(self.cache.kv, old.kv):
                t[:, : len(self.rows), :, : self.pos] = o[:, : len(self.rows), :, : self.pos]
        self.view = None

    def _move(self, first: int, by: int) -> None:
        """Shift the live rows' columns ``[first, pos)`` by ``by`` (their starts and ``pos`` follow)."""
        R, width = len(self.rows), self.pos - first
        for t in self.cache.kv:
            t[:, :R, :, first + by : first + by + width] = t[:, :R, :, first : first + width].clone()
        self.start = self.start + by
        self.pos += by

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos >= self.cache.max_len:
            self._room(0, 1, len(self.rows))
        if self.view is None:
            self.view = copy.copy(self.cache)
            self.view._set([t[:, : len(self.rows)] for t in self.cache.kv])
        self.view.pos = self.pos
        extra = ()
        if bool(self.start.any()):  # rows that joined later: their own positions, the columns before them masked
            mask = torch.arange(self.pos + 1, device=self.device) >= self.start[:, None, None, None]
            extra = ((self.pos - self.start)[:, None], mask)
        logits = self.step_fn(tokens, self.view, *extra)
        self.pos += 1
        return logits


# ---- beam search (transformers' algorithm) -------------------------------------------------------------------------


def _ban_ngrams(scores: torch.Tensor, seqs: list[list[int]], size: int) -> torch.Tensor:
    """transformers' ``no_repeat_ngram_size``: a token that would repeat an n-gram of its sequence gets -inf."""
    if size <= 0:
        return scores
    banned = [(b, seq[i + size - 1]) for b, seq in enumerate(seqs) if len(seq) + 1 >= size
              for i in range(len(seq) - size + 1) if seq[i:i + size - 1] == seq[len(seq) - size + 1:]]
    if not banned:
        return scores
    rows, toks = zip(*banned)
    scores = scores.clone()
    scores[list(rows), list(toks)] = float("-inf")
    return scores


def _beam_search(model, prompt: list[int], p: SamplingParams, tokenizer) -> list[_Row]:
    """The ``p.n`` best of ``p.num_beams`` beams as finished rows, step for step as transformers' (v5) beam search
    (a hypothesis scores ``sum_logprobs / generated_len ** length_penalty``); stop strings cut afterwards."""
    device, k = model.wte.weight.device, p.num_beams
    text = None if tokenizer is None else _TokenText.of(tokenizer, model.config.vocab_size, device)
    limit = _row_limit(model, len(prompt), p.max_new_tokens)
    if limit <= 0:
        return [_Row(0, text is not None) for _ in range(p.n)]
    cache = model.new_kv_cache(1, max_len=len(prompt) + limit)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache, last_only=True)[0][:, -1].expand(k, -1)
    cache.repeat(k)
    beams: list[list[tuple[int, float]]] = [[] for _ in range(k)]  # (token, raw log-prob) per new token
    beam_scores = torch.tensor([0.0] + [-1e9] * (k - 1), device=device)  # one live beam at first (the same prompt)
    finished: list[tuple[float, list[tuple[int, float]], str]] = []  # (score, hypothesis, reason), best first
    step_fn, utf8 = fastdecode.step_fn(model), _utf8_mask(text, k)
    stop_ids = torch.tensor(p.stop_ids, dtype=torch.long, device=device)
    for gen_len in range(1, limit + 1):
        logp = F.log_softmax(logits.float(), dim=-1)  # (k, V); the hypotheses keep these raw log-probs
        scores = logp if utf8 is None else utf8.mask(logp)  # as transformers' processors: on the log-probs
        scores = _ban_ngrams(scores, [prompt + [t for t, _ in b] for b in beams], p.no_repeat_ngram_size)
        top_scores, top_idx = torch.topk((scores + beam_scores[:, None]).view(-1), 2 * k)
        src_beam, tok = top_idx // logp.shape[-1], top_idx % logp.shape[-1]
        hits = torch.isin(tok, stop_ids) | (gen_len >= limit)
        cands = list(zip(src_beam.tolist(), tok.tolist(), logp[src_beam, tok].tolist()))  # (beam, token, log-prob)
        norm = (top_scores / gen_len**p.length_penalty).tolist()
        for (s, t, lp), score_, hit in zip(cands[:k], norm, hits.tolist()):  # only the first k may finish
            if hit:
                stop = t in p.stop_ids
                finished.append((score_, beams[s] if stop else beams[s] + [(t, lp)], "stop" if stop else "length"))
        finished = sorted(finished, key=lambda e: -e[0])[:k]
        if bool(hits.all()):
            break
        run_scores = top_scores - hits.float() * 1e9  # the running beams: the best candidates that did not stop
        keep = torch.topk(run_scores, k).indices
        beams = [beams[s] + [(t, lp)] for s, t, lp in (cands[i] for i in keep.tolist())]
        sel_src, sel_tok, beam_scores = src_beam[keep], tok[keep], run_scores[keep]
        if len(finished) == k:  # done when no running beam can beat the worst finished one
            best_len = limit if p.early_stopping == "never" and p.length_penalty > 0.0 else gen_len
            if p.early_stopping is True or beam_scores[0].item() / best_len**p.length_penalty <= finished[-1][0]:
                break
        cache.reorder(sel_src)
        if utf8 is not None:
            utf8.reorder(sel_src)
            utf8.update(sel_tok)
        logits = step_fn(sel_tok, cache)
    rows = []
    for _, hyp, reason in finished[: p.n]:
        row = _Row(len(hyp) + 1, text is not None)
        for t, lp in hyp:
            row.add(t, lp, text, p.stop)
            if row.done:
                break
        else:  # no stop string cut it
            row.finish(reason)
        rows.append(row)
    return rows


# ---- public API ----------------------------------------------------------------------------------------------------


def generate(model, prompts: Sequence[Sequence[int]], params: Optional[SamplingParams] = None, *, tokenizer=None,
             stream: bool = False, return_logprobs: bool = False, **options):
    """Continue ``prompts`` (token-id lists) with ``params``, whose fields keyword ``options`` override
    (``generate(model, prompts, temperature=0, max_new_tokens=20)``).

    Returns each output row's new tokens, prompt-major (with ``n > 1`` row ``i*n + j`` is sample ``j`` of prompt
    ``i``), or ``GenerationResult``s with ``return_logprobs=True``. ``stream=True`` (one prompt, ``n=1``, a
    tokenizer) returns an iterator of whole-character text pieces that join to exactly the final text (text that
    may begin a stop string is held back; beam search: one piece at the end)."""
    p = replace(params or SamplingParams(), **options)
    prompts = _checked_prompts(model, prompts, p.max_new_tokens)
    if p.stop and tokenizer is None:
        raise UserError("stop: stop strings need a tokenizer (pass tokenizer=)")
    if stream and (len(prompts) != 1 or p.n != 1):
        raise UserError("n: streaming generates one sequence (one prompt, n=1)")
    if stream and tokenizer is None:
        raise UserError("stream: streaming text needs a tokenizer (pass tokenizer=)")
    steps = _steps(model, prompts, p, tokenizer, return_logprobs)
    if stream:
        return _stream(steps, p.stop)
    for rows in steps:  # to the last step
        pass
    return [GenerationResult(r.tokens, r.logprobs, r.reason, r.text) if return_logprobs else r.tokens for r in rows]


@contextmanager
def _inference(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _steps(model, prompts: list[list[int]], p: SamplingParams, tokenizer, want_logprobs: bool) -> Iterator[list[_Row]]:
    """The rows (prompt-major) after the prefill and after every decoding step (beam search: once, at the end)."""
    with _inference(model):
        if p.num_beams > 1:
            yield [row for ids in prompts for row in _beam_search(model, ids, p, tokenizer)]
            return
        batch = DecodeBatch(model, tokenizer, want_logprobs)
        rows = batch.add(prompts, p)
        yield rows
        while batch.rows:
            batch.step()
            yield rows


def _stream(steps: Iterator[list[_Row]], stops: tuple[str, ...]) -> Iterator[str]:
    emitted = 0
    for (r,) in steps:
        end = len(r.text) if r.done else len(r.text) - stop_prefix_len(r.text, stops)
        if end > emitted:
            yield r.text[emitted:end]
            emitted = end


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of some stop string (to hold back)."""
    ends = (k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k]))
    return max(ends, default=0)


def score(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
          batch_size: int = 16) -> list[list[float]]:
    """log p of each completion token given its prompt and the completion tokens before it (``token_logprobs``)."""
    if len(prompts) != len(completions):
        raise UserError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    ctx = model.config.block_size
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) + len(c) > ctx and model.config.pos == "learned":
            raise UserError(f"score: sequence {i} has {len(p) + len(c)} tokens, more than the model's context of {ctx}")
    out: list[list[float]] = []
    with _inference(model):
        for b0 in range(0, len(prompts), batch_size):
            ps, cs = prompts[b0 : b0 + batch_size], completions[b0 : b0 + batch_size]
            logp, _, _ = token_logprobs(model, *pack_replies(ps, cs, device=model.wte.weight.device))
            out.extend(row[: len(c)] for row, c in zip(logp.tolist(), cs))
    return out
