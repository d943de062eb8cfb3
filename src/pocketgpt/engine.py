"""The generation engine: prefill once, decode token by token over the model's KV cache.

Everything that produces text goes through here (``pocketgpt sample``, chat, the HTTP server, RL rollouts)::

    generate(model, prompts, ...)            batched prompts of any lengths → new token ids per prompt
    stream_generate(model, tok, ids, ...)    the same for one prompt, yielding text pieces (always whole UTF-8)
    sequence_logprobs(model, sequences)      log p(token | prefix) of given sequences, one padded forward
    score(model, prompts, completions)       log-probs of completion tokens after their prompts
    token_logprobs(model, *pack_replies(..)) the one (temperature-aware, differentiable) log-prob function that
                                             score, the RL stages, DPO and the reward model's rows are built on

How a batch is decoded (``_decode``):

    prompts ─▶ cut to the context (warning) ─▶ left-pad to one length (per-row position_ids + attention mask)
            ─▶ one prefill forward (logits of the last position only) ─▶ cache.repeat(n) for n samples per prompt
            ─▶ loop: penalties → temperature → top-k → top-p → min-p → sample/argmax
                     ─▶ per-row stop checks (stop ids, stop strings, max_new_tokens, context) ─▶ feed the tokens
                        (one token per row through ``model.decoder()``: the forward without module overhead)

Prompts longer than the context are cut from the left (a warning), keeping room for the answer; with learned
positions a row stops at the context ("length"), rope/sinusoidal models may run past it (the cache grows to fit).

Log-probs (``return_logprobs=True``) are always those of the *unmodified* model distribution at temperature 1
(log-softmax of the raw logits), whatever sampling filters chose the token: PPO/GRPO need the policy's own
probabilities, and the API's ``logprobs`` are then comparable across sampling settings.

Beam search (``num_beams > 1``) follows ``transformers``' ``generate`` step for step (its v5 algorithm: keep the
top ``2·num_beams`` continuations, a finished hypothesis scores ``sum_logprobs / generated_len**length_penalty``
where the length counts the stop token, the same early-stopping rules), so both return the same sequences.
"""

from __future__ import annotations

import codecs
import logging
import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "GenerationResult",
    "generate",
    "stream_generate",
    "sequence_logprobs",
    "score",
    "logprobs_from_logits",
    "pack_replies",
    "token_logprobs",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
]


@dataclass
class GenerationResult:
    """One generated continuation: new tokens only (stop tokens and stop strings excluded).

    ``logprobs[i]`` is log p(tokens[i]) under the raw model distribution (temperature 1, no filters).
    ``finish_reason`` is ``"stop"`` (a stop token or stop string) or ``"length"`` (max_new_tokens or the context).
    ``text`` is the decoded text when a tokenizer was given (cut exactly before a stop string), else None.
    """

    tokens: list[int]
    logprobs: Optional[list[float]]
    finish_reason: str
    text: Optional[str] = None


# --------------------------------------------------------------------------------------------------------------------
# logits filters (each returns new logits with removed entries set to -inf; same semantics as transformers' warpers)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept), the rest become -inf."""
    k = min(int(k), logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked strictly above
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the most likely token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         entropy: bool = False):
    """log p(target) under softmax(logits / temperature): ``logits`` (..., V), ``targets`` (...) → (...) float32.

    The one formula behind every log-prob in pocketgpt (sampling, ``token_logprobs``, PPO/GRPO ratios, KL, DPO).
    Dividing by the sampling temperature (as TRL does) makes the ratios and KL those of the distribution the replies
    were sampled from. ``entropy=True`` also returns the entropy of that distribution per position.
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if entropy:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    return logp


def pack_replies(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], pad_id: int = 0, device=None):
    """Right-padded ``prompt + reply`` rows for one forward → ``(idx (B, L), pos (B, T), targets (B, T), mask (B, T))``.

    ``pos[b, t]`` is the position whose logits predict reply token t (``len(prompt) - 1 + t``); ``mask`` is True on
    real reply tokens; T is the longest reply (at least 1). Right padding: causal attention never sees the pads.
    """
    B = len(prompts)
    T = max(1, max((len(r) for r in replies), default=1))
    L = max(1, max((len(p) + len(r) for p, r in zip(prompts, replies)), default=1))
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        if not p:
            raise UserError(f"score: row {b} has an empty prompt (the first token has no log-prob)")
        row = [int(t) for t in p] + [int(t) for t in r]
        idx[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        n = len(r)
        pos[b, :] = len(p) - 1
        pos[b, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        if n:
            targets[b, :n] = torch.tensor([int(t) for t in r], dtype=torch.long)
        mask[b, :n] = True
    if device is not None:
        idx, pos, targets, mask = (t.to(device) for t in (idx, pos, targets, mask))
    return idx, pos, targets, mask


def token_logprobs(model, idx: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                   temperature: float = 1.0, entropy: bool = False, hidden: bool = False):
    """Per-token log-probs of ``targets`` read at positions ``pos`` of one forward over ``idx`` (``pack_replies``).

    Differentiable (grad flows when enabled); the lm_head runs only on the T reply positions. Returns
    ``(logp, entropy, hidden)`` — (B, T), (B, T) or None, (B, T, C) or None — with 0 where ``mask`` is False.
    ``model`` is a GPT or a DDP / compiled wrapper of one (the whole computation is its forward).
    """
    logits, h = model(idx, at=pos)
    out = logprobs_from_logits(logits, targets, temperature, entropy=entropy)
    logp, ent = out if entropy else (out, None)
    m = mask.to(logp.dtype)
    return logp * m, (ent * m if entropy else None), (h if hidden else None)


# --------------------------------------------------------------------------------------------------------------------
# what the engine knows of a tokenizer's tokens: their bytes, and the UTF-8 masks (computed once per tokenizer)

# A row's UTF-8 state: (continuation bytes pending, allowed range of the next byte); the byte after E0, ED, F0 and
# F4 has a narrower range than 80-BF (no overlong forms, no surrogates, nothing above U+10FFFF).
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
    """Per-token bytes of a tokenizer (``.bytes[id]``) and, for tokenizers whose tokens can hold part of a character
    (byte-level BPE), the tables that keep generated text valid UTF-8 by construction (``.blocked`` is None
    otherwise): ``blocked[s, t]`` token t cannot come next in state s (``_STATES``), ``next[s, t]`` the state after
    it. Ids beyond the tokenizer (a padded model vocabulary) are always blocked. Built once per (tokenizer, model
    vocabulary, device), so that a step's mask is one gather.
    """

    def __init__(self, tokenizer, V: int, device):
        n_tok = int(getattr(tokenizer, "vocab_size", V))
        if callable(getattr(tokenizer, "decode_bytes", None)):
            self.bytes = [bytes(tokenizer.decode_bytes([i])) if i < n_tok else b"" for i in range(V)]
        else:  # exact for tokenizers whose tokens are whole characters
            self.bytes = [tokenizer.decode([i]).encode("utf-8") if i < n_tok else b"" for i in range(V)]
        self.blocked = None
        index = {st: i for i, st in enumerate(_STATES)}
        allowed = [[False] * V for _ in _STATES]
        nxt = [[0] * V for _ in _STATES]
        for t, b in enumerate(self.bytes[:n_tok]):
            for s, state in enumerate(_STATES):
                after = _utf8_after(b, *state) if b or s == 0 else None  # an empty token cannot end a character
                if after is not None:
                    allowed[s][t], nxt[s][t] = True, index[after]
        if n_tok >= V and all(allowed[0]) and not any(nxt[0]):
            return  # every token is whole characters: nothing to mask
        for row in allowed:
            if not any(row):  # a vocabulary lacking every byte this state needs: leave such rows unmasked
                row[:] = [True] * V
        self.blocked = ~torch.tensor(allowed, dtype=torch.bool, device=device)
        self.next = torch.tensor(nxt, dtype=torch.long, device=device)

    @staticmethod
    def of(tokenizer, V: int, device) -> "_TokenText":
        try:
            per = _TABLES.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: no cache
            return _TokenText(tokenizer, V, device)
        key = (V, int(getattr(tokenizer, "vocab_size", V)), str(device))
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


class _Row:
    """Decoding state of one output row."""

    __slots__ = ("tokens", "logprobs", "done", "reason", "limit", "text", "decoder", "byte_ends", "scan_from")

    def __init__(self, limit: int, with_text: bool):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done = False
        self.reason = "length"
        self.limit = limit  # how many new tokens this row may produce (max_new_tokens, the context)
        self.text = "" if with_text else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if with_text else None
        self.byte_ends: list[int] = []  # cumulative byte length after each token (to cut at a stop string)
        self.scan_from = 0

    def finish(self, reason: str) -> None:
        # no final flush of the decoder: a character cut by the length limit is left out, never shown as U+FFFD
        self.done = True
        self.reason = "stop" if reason == "stop_string" else reason


# --------------------------------------------------------------------------------------------------------------------
# option checks


def _check_options(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, num_beams,
                   n, stop, tokenizer) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError("generate: prompts must be a non-empty list of token-id lists")
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        if isinstance(p, (int, str)) or not hasattr(p, "__len__"):
            raise UserError(f"generate: prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise UserError(f"generate: prompt {i} is empty (give at least one token, e.g. <|endoftext|>)")
        bad = [t for t in p if not (0 <= int(t) < V)]
        if bad:
            raise UserError(f"generate: prompt {i}: token id {bad[0]} is outside the vocabulary (size {V})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens: must be a non-negative integer, got {max_new_tokens!r}")
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature: must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise UserError(f"top_k: must be a positive integer (or 0/None for off), got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise UserError(f"top_p: must be in (0, 1], got {top_p!r}")
    if min_p is not None and not (0.0 <= min_p <= 1.0):
        raise UserError(f"min_p: must be in [0, 1], got {min_p!r}")
    if not repetition_penalty > 0:
        raise UserError(f"repetition_penalty: must be > 0 (1 = off), got {repetition_penalty!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams: must be a positive integer, got {num_beams!r}")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"n: must be a positive integer, got {n!r}")
    if num_beams > 1 and n > num_beams:
        raise UserError(f"n: with beam search at most num_beams ({num_beams}) sequences can be returned, got {n}")
    if stop and tokenizer is None:
        raise UserError("stop: stop strings need a tokenizer (pass tokenizer=)")


def _fit_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Cut prompts longer than the context from the left (keeping room to answer), with a warning."""
    ctx = model.config.block_size
    keep = max(1, ctx - min(max_new_tokens, ctx // 2))
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if len(p) > ctx:
            msg = (f"prompt {i} has {len(p)} tokens, more than the model's context of {ctx}: "
                   f"keeping its last {keep} tokens")
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)
            p = p[-keep:]
        out.append(p)
    return out


def _row_limit(model, prompt_len: int, max_new_tokens: int) -> int:
    """New tokens a row may produce: learned positions stop at the context (the last token needs no position)."""
    if model.config.pos == "learned":
        return min(max_new_tokens, model.config.block_size - prompt_len + 1)
    return max_new_tokens


def _normalize_stop_ids(stop_ids) -> frozenset:
    if stop_ids is None:
        return frozenset()
    if isinstance(stop_ids, int):
        return frozenset([stop_ids])
    return frozenset(int(t) for t in stop_ids)


def _normalize_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    out = [s for s in stop if s]
    return out


# --------------------------------------------------------------------------------------------------------------------
# the decoding loop (greedy / sampling, batched, n per prompt)


class _Sampler:
    """Turns one step's logits (R, V) into tokens, holding the penalty state across steps."""

    def __init__(self, prompts, n, V, device, temperature, top_k, top_p, min_p, repetition_penalty,
                 presence_penalty, frequency_penalty, seed, utf8: Optional[_Utf8Mask] = None):
        self.utf8 = utf8
        self.temperature = float(temperature)
        self.top_k = int(top_k) if top_k else None
        self.top_p = float(top_p) if top_p is not None and top_p < 1.0 else None
        self.min_p = float(min_p) if min_p else None
        self.rep = float(repetition_penalty)
        self.presence = float(presence_penalty or 0.0)
        self.frequency = float(frequency_penalty or 0.0)
        R = len(prompts) * n
        self.seen = None
        if self.rep != 1.0:  # every token of the prompt and the output so far (as transformers)
            self.seen = torch.zeros(R, V, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                self.seen[i * n : (i + 1) * n, torch.tensor(sorted(set(p)), device=device)] = True
        self.counts = None
        if self.presence or self.frequency:  # generated tokens only (as the OpenAI API)
            self.counts = torch.zeros(R, V, dtype=torch.float32, device=device)
        self.generator = None
        if seed is not None and self.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.utf8 is not None:
            logits = self.utf8.mask(logits)
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * self.rep, logits / self.rep)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        if self.temperature == 0.0:
            return logits.argmax(dim=-1)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p is not None:
            logits = min_p_filter(logits, self.min_p)
        # one draw per row by an exponential race: argmax(p_i / E_i), E_i ~ Exp(1), picks i with probability p_i
        # (the trick torch.multinomial uses inside, minus its input checks and extra passes over the row)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(1e-30)  # never 0/0
        return probs.div_(race).argmax(dim=-1)

    def update(self, tokens: torch.Tensor) -> None:
        if self.utf8 is not None:
            self.utf8.update(tokens)
        idx = tokens.unsqueeze(1)
        if self.seen is not None:
            self.seen.scatter_(1, idx, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))


def _decode(model, prompts: list[list[int]], max_new_tokens: int, n: int, sampler_opts: dict, stop_ids: frozenset,
            stops: list[str], tokenizer, want_logprobs: bool) -> Iterator[list[_Row]]:
    """Generator: yields the rows after every decoding step (streaming reads them); rows are prompt-major."""
    device = model.wte.weight.device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    P = max(lens)
    with_text = tokenizer is not None
    text = _TokenText.of(tokenizer, model.config.vocab_size, device) if with_text else None
    rows = [_Row(_row_limit(model, lens[i], max_new_tokens), with_text) for i in range(B) for _ in range(n)]
    max_steps = max(r.limit for r in rows)
    for r in rows:
        if r.limit <= 0:
            r.finish("length")
    if max_steps <= 0:
        yield rows
        return
    max_stop = max((len(s) for s in stops), default=0)

    # ---- prefill (left padding when lengths differ)
    padded = any(L != P for L in lens)
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    cache = model.new_kv_cache(B, max_len=P + max_steps)
    pos_ids = key_ok = None
    if padded:
        pads = torch.tensor([P - L for L in lens], device=device)
        ar = torch.arange(P, device=device)
        pos_ids = (ar[None, :] - pads[:, None]).clamp_min(0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        valid_key = ar[None, :] >= pads[:, None]  # (B, P)
        mask = (causal[None] & valid_key[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        logits, _ = model(idx, kv_cache=cache, position_ids=pos_ids, attn_mask=mask[:, None], last_only=True)
        logits = logits[:, -1]
        # decode-time mask over the whole cache: pad slots stay masked, every later slot is valid
        key_ok = torch.ones(B, 1, 1, cache.max_len, dtype=torch.bool, device=device)
        key_ok[:, 0, 0, :P] = valid_key
        pos_ids = torch.tensor(lens, device=device).unsqueeze(1)  # position of the next fed token
    else:
        logits = model(idx, kv_cache=cache, last_only=True)[0][:, -1]
    if n > 1:
        cache.repeat(n)
        logits = logits.repeat_interleave(n, dim=0)
        if padded:
            key_ok = key_ok.repeat_interleave(n, dim=0)
            pos_ids = pos_ids.repeat_interleave(n, dim=0)
    if padded and model.config.pos == "learned":
        pos_cap = model.config.block_size - 1  # finished rows keep being fed; keep their positions in range
    else:
        pos_cap = None

    utf8 = _Utf8Mask(text, B * n) if text is not None and text.blocked is not None else None
    sampler = _Sampler(prompts, n, model.config.vocab_size, device, **sampler_opts, utf8=utf8)
    step_fn = model.decoder()
    for step in range(max_steps):
        last = logits.float()
        tokens = sampler(last)
        sampler.update(tokens)
        tok_list = tokens.tolist()
        lp_list = logprobs_from_logits(last, tokens).tolist() if want_logprobs else None
        for i, r in enumerate(rows):
            if r.done:
                continue
            t = tok_list[i]
            if t in stop_ids:
                r.finish("stop")
                continue
            r.tokens.append(t)
            if lp_list is not None:
                r.logprobs.append(lp_list[i])
            if with_text:
                b = text.bytes[t]
                r.byte_ends.append((r.byte_ends[-1] if r.byte_ends else 0) + len(b))
                r.text += r.decoder.decode(b)
                if stops and _cut_at_stop(r, stops, max_stop):
                    continue
            if len(r.tokens) >= r.limit:
                r.finish("length")
        if all(r.done for r in rows):
            break
        yield rows
        if padded:
            mask = key_ok[..., : cache.pos + 1]
            pos = pos_ids if pos_cap is None else pos_ids.clamp_max(pos_cap)
            logits = step_fn(tokens, cache, pos, mask)
            pos_ids = pos_ids + 1
        else:
            logits = step_fn(tokens, cache)
    yield rows


def _cut_at_stop(r: _Row, stops: list[str], max_stop: int) -> bool:
    """If a stop string appeared in the row's text, cut text and tokens exactly before it and finish the row."""
    start = max(0, r.scan_from - max_stop + 1)
    found = -1
    for s in stops:
        j = r.text.find(s, start)
        if j != -1 and (found == -1 or j < found):
            found = j
    r.scan_from = len(r.text)
    if found == -1:
        return False
    r.text = r.text[:found]
    cut_bytes = len(r.text.encode("utf-8", errors="surrogatepass"))
    keep = 0
    while keep < len(r.tokens) and r.byte_ends[keep] <= cut_bytes:
        keep += 1
    del r.tokens[keep:]
    del r.byte_ends[keep:]
    if r.logprobs:
        del r.logprobs[keep:]
    r.finish("stop_string")
    return True


# --------------------------------------------------------------------------------------------------------------------
# beam search (transformers' algorithm)


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


def _beam_search(model, prompt: list[int], max_new_tokens: int, num_beams: int, length_penalty: float,
                 early_stopping, stop_ids: frozenset, n: int, no_repeat_ngram_size: int = 0,
                 text: Optional[_TokenText] = None) -> list[tuple[list[int], list[float], str]]:
    device = model.wte.weight.device
    limit = _row_limit(model, len(prompt), max_new_tokens)
    if limit <= 0:
        return [([], [], "length")] * n
    K = 2 * num_beams  # candidates kept per step (enough to continue when the best ones all stop)
    cache = model.new_kv_cache(1, max_len=len(prompt) + limit)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache, last_only=True)[0][:, -1]
    cache.repeat(num_beams)
    logits = logits.expand(num_beams, -1)
    beams: list[tuple[list[int], list[float]]] = [([], []) for _ in range(num_beams)]
    beam_scores = torch.full((num_beams,), -1e9, device=device)
    beam_scores[0] = 0.0  # only the first beam is live at the start (all beams are the same prompt)
    finished: list[tuple[float, list[int], list[float], str]] = []  # (score, tokens, logprobs, reason)
    improvable = True
    step_fn = model.decoder()
    stop_list = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long) if stop_ids else None
    utf8 = _Utf8Mask(text, num_beams) if text is not None and text.blocked is not None else None
    for step in range(limit):
        gen_len = step + 1
        logp = F.log_softmax(logits.float(), dim=-1)  # (num_beams, V); the hypotheses keep these raw log-probs
        V = logp.shape[-1]
        scores = logp if utf8 is None else utf8.mask(logp)  # as transformers' processors: on the log-probs
        scores = _ban_ngrams(scores, [prompt + b[0] for b in beams], no_repeat_ngram_size)
        total = (scores + beam_scores[:, None]).view(-1)
        top_scores, top_idx = torch.topk(total, K)
        src_beam, tok = top_idx // V, top_idx % V
        hits = torch.zeros(K, dtype=torch.bool, device=device)
        if stop_list is not None:
            hits = torch.isin(tok, stop_list)
        if gen_len >= limit:
            hits[:] = True
        # finished hypotheses: only among the first num_beams candidates
        full = len(finished) == num_beams
        if improvable and not (full and early_stopping is True):
            norm = top_scores / (gen_len ** length_penalty)
            src_l, tok_l, hit_l, norm_l = src_beam.tolist(), tok.tolist(), hits.tolist(), norm.tolist()
            for j in range(num_beams):
                if not hit_l[j]:
                    continue
                toks, lps = beams[src_l[j]]
                t = tok_l[j]
                is_stop = t in stop_ids
                new_lp = logp[src_l[j], t].item()
                entry = (norm_l[j], toks + ([] if is_stop else [t]), lps + ([] if is_stop else [new_lp]),
                         "stop" if is_stop else "length")
                finished.append(entry)
            finished.sort(key=lambda e: -e[0])
            del finished[num_beams:]
        # running beams: the best candidates that did not stop
        run_scores = top_scores - hits.float() * 1e9
        keep = torch.topk(run_scores, num_beams).indices
        if bool(hits.all()):
            break
        sel_src, sel_tok = src_beam[keep], tok[keep]
        src_l, tok_l = sel_src.tolist(), sel_tok.tolist()
        beams = [(beams[s][0] + [t], beams[s][1] + [logp[s, t].item()]) for s, t in zip(src_l, tok_l)]
        beam_scores = run_scores[keep]
        # stopping rules
        full = len(finished) == num_beams
        if full:
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = limit
            else:
                best_len = gen_len
            best_possible = beam_scores[0].item() / (best_len ** length_penalty)
            improvable = improvable and best_possible > finished[-1][0]
        if not improvable or (full and early_stopping is True):
            break
        cache.reorder(sel_src)
        if utf8 is not None:
            utf8.reorder(sel_src)
            utf8.update(sel_tok)
        logits = step_fn(sel_tok, cache)
    return [(toks, lps, reason) for _, toks, lps, reason in finished[:n]]


# --------------------------------------------------------------------------------------------------------------------
# public API


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping=False,
    no_repeat_ngram_size: int = 0,
    n: int = 1,
    stop_ids=None,
    stop=None,
    tokenizer=None,
    seed: Optional[int] = None,
    return_logprobs: bool = False,
    on_step=None,
):
    """Generate continuations of ``prompts`` (token-id lists); returns the new tokens of each output row.

    Rows are prompt-major: with ``n > 1`` row ``i*n + j`` is sample ``j`` of prompt ``i``. ``temperature=0`` is
    greedy. ``stop_ids`` (ints) end a row without being included; ``stop`` strings (need ``tokenizer``) cut the
    output exactly before the string. With ``return_logprobs=True`` a list of ``GenerationResult`` comes back.
    ``num_beams > 1`` runs beam search (deterministic; sampling options and penalties are not used) and returns the
    ``n`` best hypotheses per prompt; ``no_repeat_ngram_size`` (beams only, as transformers) bans repeated n-grams.

    With a ``tokenizer`` the generated text is valid UTF-8 by construction (greedy, sampled and beams): at each step
    the tokens whose bytes cannot continue the pending partial character (or start a new one) are masked, so a
    byte-level BPE never writes a stray byte (U+FFFD); log-probs stay those of the unmasked model. A character cut
    by ``max_new_tokens`` is left out of the text.

    ``on_step(rows)``, if given, is called after every decoding step (not for beam search) with the live state of
    every output row (``.tokens``, ``.text`` (with a tokenizer), ``.done``, ``.reason``); an exception raised in it
    stops decoding and propagates (the server uses this to stream batched requests and to drop cancelled ones).
    """
    _check_options(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, num_beams,
                   n, stop, tokenizer)
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise UserError(f"no_repeat_ngram_size: must be a non-negative integer (0 = off), got {no_repeat_ngram_size!r}")
    results = list(_generate_results(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                     repetition_penalty, presence_penalty, frequency_penalty, num_beams,
                                     length_penalty, early_stopping, n, stop_ids, stop, tokenizer, seed,
                                     return_logprobs, on_step, no_repeat_ngram_size))
    if return_logprobs:
        return results
    return [r.tokens for r in results]


def _generate_results(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                      presence_penalty, frequency_penalty, num_beams, length_penalty, early_stopping, n, stop_ids,
                      stop, tokenizer, seed, want_logprobs, on_step=None,
                      no_repeat_ngram_size=0) -> list[GenerationResult]:
    prompts = _fit_prompts(model, prompts, max_new_tokens)
    stop_ids = _normalize_stop_ids(stop_ids)
    stops = _normalize_stop(stop)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if num_beams > 1:
                table = None if tokenizer is None else _TokenText.of(tokenizer, model.config.vocab_size,
                                                                     model.wte.weight.device)
                out = []
                for p in prompts:
                    for toks, lps, reason in _beam_search(model, p, max_new_tokens, num_beams, length_penalty,
                                                          early_stopping, stop_ids, n, no_repeat_ngram_size, table):
                        out.append(_finish_beam(toks, lps, reason, stops, table, want_logprobs))
                return out
            opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, seed=seed)
            rows = None
            for rows in _decode(model, prompts, max_new_tokens, n, opts, stop_ids, stops, tokenizer, want_logprobs):
                if on_step is not None:
                    on_step(rows)
            return [GenerationResult(r.tokens, r.logprobs if want_logprobs else None, r.reason, r.text)
                    for r in rows]
    finally:
        model.train(was_training)


def _finish_beam(toks, lps, reason, stops, table: Optional[_TokenText], want_logprobs) -> GenerationResult:
    text = None
    if table is not None:
        row = _Row(len(toks) + 1, True)
        max_stop = max((len(s) for s in stops), default=0)
        for t, lp in zip(toks, lps):
            row.tokens.append(t)
            row.logprobs.append(lp)
            b = table.bytes[t]
            row.byte_ends.append((row.byte_ends[-1] if row.byte_ends else 0) + len(b))
            row.text += row.decoder.decode(b)
            if stops and _cut_at_stop(row, stops, max_stop):
                break
        if not row.done:
            row.finish(reason)
        toks, lps, reason, text = row.tokens, row.logprobs, row.reason, row.text
    return GenerationResult(list(toks), list(lps) if want_logprobs else None, reason, text)


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], **options) -> Iterator[str]:
    """Generate from one prompt, yielding text pieces as soon as they are complete UTF-8.

    Takes the options of ``generate`` (``n`` must be 1). Text that might be the start of a stop string is held
    back until it is known not to be one, so the pieces join to exactly the final (cut) text. Beam search yields
    its result in one piece at the end.
    """
    if options.get("n", 1) != 1:
        raise UserError("n: streaming generates one sequence (n=1)")
    options.pop("return_logprobs", None)
    options.pop("tokenizer", None)
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "n",
             "stop_ids", "stop", "seed")
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"stream_generate() got unexpected option(s): {', '.join(unknown)}")
    args = dict(max_new_tokens=256, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, num_beams=1, length_penalty=1.0, early_stopping=False,
                no_repeat_ngram_size=0, n=1, stop_ids=None, stop=None, seed=None)
    args.update(options)
    _check_options(model, [prompt_ids], args["max_new_tokens"], args["temperature"], args["top_k"], args["top_p"],
                   args["min_p"], args["repetition_penalty"], args["num_beams"], 1, args["stop"], tokenizer)
    if args["num_beams"] > 1:
        (res,) = generate(model, [prompt_ids], tokenizer=tokenizer, return_logprobs=True, **args)
        if res.text:
            yield res.text
        return
    stops = _normalize_stop(args["stop"])
    stop_ids = _normalize_stop_ids(args["stop_ids"])
    prompts = _fit_prompts(model, [prompt_ids], args["max_new_tokens"])
    opts = {k: args[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                 "frequency_penalty", "seed")}
    emitted = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for rows in _decode(model, prompts, args["max_new_tokens"], 1, opts, stop_ids, stops, tokenizer, False):
                r = rows[0]
                end = len(r.text) if r.done else len(r.text) - stop_prefix_len(r.text, stops)
                if end > emitted:
                    piece = r.text[emitted:end]
                    emitted = end
                    yield piece
                if r.done:
                    return
    finally:
        model.train(was_training)


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of some stop string (to hold back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# --------------------------------------------------------------------------------------------------------------------
# scoring given sequences


def sequence_logprobs(model, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> list[list[float]]:
    """log p(seq[t] | seq[:t]) for t = 1 .. len-1 of every sequence (the raw distribution: temperature 1)."""
    return score(model, [list(s[:1]) for s in sequences], [list(s[1:]) for s in sequences], batch_size)


def score(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
          batch_size: int = 16) -> list[list[float]]:
    """log p of each completion token given its prompt and the completion tokens before it (``token_logprobs``)."""
    if len(prompts) != len(completions):
        raise UserError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    ctx = model.config.block_size
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) + len(c) > ctx and model.config.pos == "learned":
            raise UserError(f"score: sequence {i} has {len(p) + len(c)} tokens, more than the model's context of {ctx}")
    device = model.wte.weight.device
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b0 in range(0, len(prompts), batch_size):
                ps, cs = prompts[b0: b0 + batch_size], completions[b0: b0 + batch_size]
                logp, _, _ = token_logprobs(model, *pack_replies(ps, cs, device=device))
                out.extend(row[: len(c)] for row, c in zip(logp.tolist(), cs))
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------------------------
# CLI: pocketgpt sample


def configure_cli(name, p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (pocketgpt or Hugging Face GPT-2/Llama)")
    p.add_argument("--prompt", default=None, help="prompt text (default: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p × the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1 = off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty (default 1)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3,
                   help="beam search never repeats an n-gram of this size (default 3: beams of small models loop "
                        "otherwise; 0 = off)")
    p.add_argument("--n", type=int, default=1, help="number of samples (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="fp32", help="weights precision: fp32, bf16, fp16 (default fp32)")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    from .chat import find_checkpoint
    from .model import GPT
    from .runtime import DTYPES, pick_device
    from .tokenizer import load_tokenizer_for

    if args.n < 1:
        raise UserError(f"--n: must be at least 1, got {args.n}")
    ckpt = find_checkpoint(args.ckpt)
    device = pick_device(args.device)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype: unknown precision {args.dtype!r} (fp32, bf16, fp16)")
    tokenizer = load_tokenizer_for(ckpt)
    model = GPT.from_pretrained(ckpt, device=device, dtype=DTYPES[args.dtype])
    specials = getattr(tokenizer, "special_ids", None) or {}
    eot = specials.get("<|endoftext|>")
    if args.prompt:
        prompt = tokenizer.encode(args.prompt)
    elif eot is not None:
        prompt = [eot]
    else:
        raise UserError("--prompt: this tokenizer has no <|endoftext|> token; give a prompt")
    if not prompt:
        prompt = [eot] if eot is not None else None
        if prompt is None:
            raise UserError("--prompt: encodes to no tokens")
    stop_ids = [eot] if eot is not None else None
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                num_beams=args.num_beams, length_penalty=args.length_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, stop_ids=stop_ids, stop=args.stop)
    out = sys.stdout
    for i in range(args.n):
        if args.n > 1:
            out.write(f"--- sample {i + 1} ---\n")
        seed = None if args.seed is None else args.seed + i
        out.write(args.prompt or "")
        out.flush()
        for piece in stream_generate(model, tokenizer, prompt, seed=seed, **opts):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0
