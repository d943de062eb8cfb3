"""The chat template (one function for training and inference) and a chat session (``pocketgpt chat``: cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from .errors import UserError
from .records import check_messages, fit
from .tokenizer import CHAT_TOKENS

IGNORE = -100  # label of positions that carry no loss

# Sampling defaults of `pocketgpt chat`, ChatSession, the server (for fields a request leaves out) and the speedrun
# report. A mild repetition penalty: small models' greedy replies otherwise loop ("And / And", "我我我"); 1 is off.
CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": None, "repetition_penalty": 1.1}


def specials(tokenizer) -> dict[str, int]:
    missing = [name for name in CHAT_TOKENS if name not in tokenizer.special_ids]
    if missing:
        raise UserError(f"tokenizer has no chat special token {missing[0]}; SFT adds them (pocketgpt sft --init CKPT) "
                        "or train a tokenizer with pocketgpt tokenizer train")
    return tokenizer.special_ids


def _pieces(messages: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each message: ``<|ROLE|>`` content ``<|end|>``, labelled on an assistant's content and end."""
    sp = specials(tokenizer)
    out = []
    for m in messages:
        ids = [sp[f"<|{m['role']}|>"], *(tokenizer.encode(m["content"]) if m["content"] else []), sp["<|end|>"]]
        out.append((ids, [IGNORE, *ids[1:]] if m["role"] == "assistant" else [IGNORE] * len(ids)))
    return out


def _concat(pieces: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    return [t for ids, _ in pieces for t in ids], [t for _, labels in pieces for t in labels]


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Ids and labels: ``<|endoftext|>``, each message, ``<|assistant|>`` if asked; train on ids[:-1] -> labels[1:]."""
    sp = specials(tokenizer)
    pieces = [([sp["<|endoftext|>"]], [IGNORE]), *_pieces(check_messages(messages) if messages else [], tokenizer)]
    if add_generation_prompt:
        pieces.append(([sp["<|assistant|>"]], [IGNORE]))
    return _concat(pieces)


def stop_id(tokenizer) -> int:  # the id that ends an assistant reply
    return specials(tokenizer)["<|end|>"]


@dataclass
class FitStats:
    """What ``fit_to_context`` did to a set of conversations (reported by SFT)."""

    conversations: int = 0
    examples: int = 0
    split: int = 0  # conversations that became several examples
    truncated: int = 0  # conversations that lost content: a reply cut at the token level, or turns dropped
    skipped: int = 0  # conversations that gave no example at all (not even one prompt fits)

    def summary(self) -> str:
        return (f"{self.conversations} conversations -> {self.examples} examples "
                f"({self.split} split at turn boundaries, {self.truncated} truncated, {self.skipped} skipped)")


def fit_to_context(messages: list[dict], tokenizer, max_tokens: int, mode: str = "split", *,
                   stats: FitStats) -> list[tuple[list[int], list[int]]]:
    """Examples of at most ``max_tokens`` ids split at turn boundaries (docs/internals.md); "truncate": the first."""
    # the leading system messages, then each exchange (user ... assistant); what follows the last reply is dropped
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    ends = [j + 1 for j, m in enumerate(messages) if m["role"] == "assistant"]  # all at or after start
    head = render(messages[:start], tokenizer)
    examples: list[tuple[list[int], list[int]]] = []
    (ids, labels), n, lost = head, 0, False  # n: exchanges in the current example; lost: content left out of all
    for g_ids, g_labels in (_concat(_pieces(messages[a:b], tokenizer)) for a, b in zip([start, *ends], ends)):
        if n and len(ids) + len(g_ids) > max_tokens:  # close the example; the next restarts with the system prompt
            examples.append((ids, labels))
            (ids, labels), n = head, 0
            if mode == "truncate":
                lost = True
                break
        if len(ids) + len(g_ids) <= max_tokens:
            ids, labels, n = ids + g_ids, labels + g_labels, n + 1
            continue
        # one exchange too long for an example of its own: cut its reply if the prompt part and one reply token fit
        lost = True
        room = max_tokens - len(ids)
        if next(i for i, lab in enumerate(g_labels) if lab != IGNORE) < room:
            examples.append((ids + g_ids[:room], labels + g_labels[:room]))
        if mode == "truncate":
            break
    if n:
        examples.append((ids, labels))
    stats.conversations += 1
    stats.examples += len(examples)
    stats.split += len(examples) > 1
    stats.truncated += lost and bool(examples)
    stats.skipped += not examples
    return examples


@dataclass
class ChatSession:
    """A multi-turn conversation with a model; ``reply(text)`` streams the assistant's answer and records it."""

    model: object
    tokenizer: object
    system: Optional[str] = None
    temperature: float = CHAT_DEFAULTS["temperature"]
    top_k: Optional[int] = CHAT_DEFAULTS["top_k"]
    top_p: Optional[float] = CHAT_DEFAULTS["top_p"]
    repetition_penalty: float = CHAT_DEFAULTS["repetition_penalty"]
    max_new_tokens: int = 256
    seed: Optional[int] = None
    messages: list = field(default_factory=list)  # user/assistant turns (the system message is kept apart)
    notes: list = field(default_factory=list)  # things worth telling an interactive user (trimmed history...)
    _turn: int = 0

    def reset(self) -> None:
        self.messages = []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_ids(self) -> list[int]:
        """The next prompt, its oldest exchanges (never the system message) dropped to leave room for the reply."""
        block = self.model.config.block_size
        reserve = max(1, min(self.max_new_tokens, block // 2))
        dropped = 0
        while True:
            ids, _ = render(self.conversation(), self.tokenizer, add_generation_prompt=True)
            if len(ids) + reserve <= block or len(self.messages) <= 1:
                break
            nxt = next((i for i, m in enumerate(self.messages[1:], 1) if m["role"] == "user"), len(self.messages) - 1)
            del self.messages[:nxt]
            dropped += 1
        if dropped:
            self.notes.append(f"(dropped the {dropped} oldest turn(s) to fit the {block}-token context)")
        if len(ids) + reserve > block:
            ids, _ = fit(ids, block, reserve)
            self.notes.append(f"(message too long for the {block}-token context: kept its last {len(ids)} tokens)")
        return ids

    def reply(self, text: str) -> Iterator[str]:
        from .engine import SamplingParams, generate

        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        params = SamplingParams(max_new_tokens=min(self.max_new_tokens, self.model.config.block_size - len(ids)),
                                **{k: getattr(self, k) for k in CHAT_DEFAULTS}, stop_ids=stop_id(self.tokenizer),
                                seed=None if self.seed is None else self.seed + self._turn)
        self._turn += 1
        parts: list[str] = []
        try:
            for piece in generate(self.model, [ids], params, tokenizer=self.tokenizer, stream=True):
                parts.append(piece)
                yield piece
        finally:  # keep what was shown, even when interrupted (Ctrl-C)
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def reply_text(self, text: str) -> str:
        return "".join(self.reply(text))
