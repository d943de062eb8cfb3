"""The chat template, and ``pocketgpt chat`` (a terminal chat).

The template (one function, used for training *and* inference, by SFT, the RL stages and the server)::

    <|endoftext|> <|system|> ...system... <|end|> <|user|> ...question... <|end|> <|assistant|> ...reply... <|end|> ...

``render(messages, tokenizer)`` returns ``(ids, labels)``: ``labels`` equals ``ids`` on assistant content and on the
``<|end|>`` that closes each assistant turn, ``-100`` everywhere else, so every assistant turn of a multi-turn
conversation is trained and nothing else is. With ``add_generation_prompt=True`` the ids end in ``<|assistant|>``;
the model writes its reply and closes it with ``<|end|>`` (the stop token). A trainer feeds ``ids[:-1]`` as input
and ``labels[1:]`` as targets.

Conversations are JSONL, one per line, ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}``
(the Hugging Face TRL / OpenAI format; other fields are ignored); ``pocketgpt.records`` reads and checks them.

Conversations longer than the context (``fit_to_context``) are **split at turn boundaries** into several training
examples: each example starts with the system message (if any) and a user turn, and holds as many consecutive
user/assistant exchanges as fit. A single exchange that does not fit alone is cut at the token level (its reply
loses its tail and its ``<|end|>``), or skipped when not even the prompt part fits. ``mode="truncate"`` instead keeps
only the first example (the system message and the leading turns that fit).

``pocketgpt chat --ckpt DIR`` (``ChatSession`` underneath): multi-turn history, replies streamed by the engine and
stopped at ``<|end|>``, ``/reset``, ``/system TEXT``, ``/temperature X``, ``/history``, ``/help``, ``/exit`` (or
Ctrl-D). Before each reply the oldest exchanges are dropped until the prompt leaves room for the reply
(``min(max_new_tokens, context/2)`` tokens, ``records.fit``); the system message is always kept. With stdin not a terminal it reads
one message per line and writes one reply per line (newlines in a reply become spaces), nothing else on stdout;
commands still work and print nothing there.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .errors import UserError
from .records import check_messages, fit

IGNORE = -100  # label of positions that carry no loss

# Sampling defaults of `pocketgpt chat`, ChatSession, the server (for fields a request leaves out) and the speedrun
# report. A mild repetition penalty: greedy and low-temperature replies of small models otherwise loop
# ("And / And / And", "我我我"); 1 turns it off.
CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": None, "repetition_penalty": 1.1}

Message = dict  # {"role": str, "content": str}
Conversation = list  # list[Message]


# --------------------------------------------------------------------------------------------------------------------
# the template


class _Specials:
    """The ids of the template's special tokens in one tokenizer (looked up once, with a clear error)."""

    def __init__(self, tokenizer):
        names = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
        ids = {}
        for name in names:
            try:
                ids[name] = tokenizer.token_id(name)
            except (KeyError, ValueError, UserError):
                ids[name] = None
            if ids[name] is None:
                raise UserError(
                    f"tokenizer has no chat special token {name}; SFT adds them (pocketgpt sft --init CKPT) "
                    "or train a tokenizer with pocketgpt tokenizer train"
                )
        self.bos = ids["<|endoftext|>"]
        self.role = {"system": ids["<|system|>"], "user": ids["<|user|>"], "assistant": ids["<|assistant|>"]}
        self.end = ids["<|end|>"]


def _specials(tokenizer) -> _Specials:
    return _Specials(tokenizer)


def _message_pieces(messages: list[Message], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each message on its own: ``<|ROLE|>`` + content + ``<|end|>``."""
    sp = _specials(tokenizer)
    pieces = []
    for m in messages:
        content = tokenizer.encode(m["content"]) if m["content"] else []
        ids = [sp.role[m["role"]], *content, sp.end]
        if m["role"] == "assistant":
            labels = [IGNORE, *content, sp.end]
        else:
            labels = [IGNORE] * len(ids)
        pieces.append((ids, labels))
    return pieces


def render(messages: list[Message], tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and training labels of a conversation (see the module docstring for the layout)."""
    messages = check_messages(messages) if messages else []
    sp = _specials(tokenizer)
    ids, labels = [sp.bos], [IGNORE]
    for p_ids, p_labels in _message_pieces(messages, tokenizer):
        ids += p_ids
        labels += p_labels
    if add_generation_prompt:
        ids.append(sp.role["assistant"])
        labels.append(IGNORE)
    return ids, labels


def stop_id(tokenizer) -> int:
    """The id that ends an assistant reply (``<|end|>``)."""
    return _specials(tokenizer).end


# --------------------------------------------------------------------------------------------------------------------
# fitting conversations into the context


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


def _exchanges(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Leading system message(s), then groups that each end with an assistant message (user ... assistant).

    Trailing messages after the last assistant turn carry no labels and are dropped.
    """
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    system, groups, cur = messages[:i], [], []
    for m in messages[i:]:
        cur.append(m)
        if m["role"] == "assistant":
            groups.append(cur)
            cur = []
    return system, groups


def _concat(pieces: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for p_ids, p_labels in pieces:
        ids += p_ids
        labels += p_labels
    return ids, labels


def fit_to_context(messages: list[Message], tokenizer, max_tokens: int, mode: str = "split",
                   stats: Optional[FitStats] = None) -> list[tuple[list[int], list[int]]]:
    """Render one conversation into training examples of at most ``max_tokens`` ids each (see module docstring).

    ``max_tokens`` counts ids, i.e. ``block_size + 1`` for a model whose input is ``ids[:-1]``. A conversation
    that fits is exactly ``[render(messages, tokenizer)]`` (minus messages after the last assistant turn).
    """
    if mode not in ("split", "truncate"):
        raise UserError(f"overflow: unknown mode {mode!r} (split, truncate)")
    stats = stats if stats is not None else FitStats()
    sp = _specials(tokenizer)
    system, groups = _exchanges(messages)
    head = _concat([([sp.bos], [IGNORE]), *_message_pieces(system, tokenizer)])
    group_ids = [_concat(_message_pieces(g, tokenizer)) for g in groups]

    examples: list[tuple[list[int], list[int]]] = []
    ids, labels = list(head[0]), list(head[1])
    n = 0  # exchanges in the current example
    lost = False  # some content of this conversation is not in any example
    for k, (g_ids, g_labels) in enumerate(group_ids):
        if n and len(ids) + len(g_ids) > max_tokens:  # close the example; the next restarts with the system prompt
            examples.append((ids, labels))
            ids, labels, n = list(head[0]), list(head[1]), 0
            if mode == "truncate":
                lost = True
                break
        if len(ids) + len(g_ids) <= max_tokens:
            ids, labels, n = ids + g_ids, labels + g_labels, n + 1
            continue
        # one exchange too long for an example of its own: cut its reply if the prompt part and one reply token fit
        lost = True
        room = max_tokens - len(ids)
        first_label = next(i for i, lab in enumerate(g_labels) if lab != IGNORE)
        if first_label < room:
            examples.append((ids + g_ids[:room], labels + g_labels[:room]))
            ids, labels = list(head[0]), list(head[1])
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


# --------------------------------------------------------------------------------------------------------------------
# a chat session: history, trimming to the context, streamed replies (shared by the terminal chat and tests)


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

    def conversation(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def prompt_ids(self) -> list[int]:
        """The prompt for the next reply, dropping the oldest exchanges until prompt + reply fit the context."""
        block = self.model.config.block_size
        reserve = max(1, min(self.max_new_tokens, block // 2))
        dropped = 0
        while True:
            ids, _ = render(self.conversation(), self.tokenizer, add_generation_prompt=True)
            if len(ids) + reserve <= block or len(self.messages) <= 1:
                break
            # drop the oldest user message and everything up to the next user message
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
        """Add the user's message, stream the reply's text pieces, then record the reply in the history."""
        from .engine import SamplingParams, generate

        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        params = SamplingParams(max_new_tokens=min(self.max_new_tokens, self.model.config.block_size - len(ids)),
                                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty, stop_ids=stop_id(self.tokenizer),
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


# --------------------------------------------------------------------------------------------------------------------
# the terminal chat

HELP = """commands:
  /reset            forget the conversation (keeps the system message)
  /system TEXT      set the system message (empty TEXT removes it)
  /temperature X    sampling temperature (0 = greedy)
  /history          show the conversation so far
  /help             this help
  /exit             quit (Ctrl-D too)"""


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (``hf:NAME`` included), or a run directory holding one (``RUN/ckpt``, else
    ``RUN/best``)."""
    from .checkpoint import local_dir

    p = local_dir(path)
    if not p.exists():
        raise UserError(f"{p}: checkpoint directory not found")
    if (p / "config.json").exists():
        return p
    for name in ("ckpt", "best"):  # a Trainer run directory: RUN/ckpt is the final model
        if (p / name / "config.json").exists():
            return p / name
    raise UserError(f"{p}: not a checkpoint directory (no config.json) nor a run directory holding one")


def load_chat_model(ckpt: str | os.PathLike, device: str = "auto", dtype: str = "fp32"):
    """Model (eval mode) + tokenizer of a checkpoint, checking that the tokenizer has the chat tokens."""
    from .checkpoint import load_model
    from .runtime import DTYPES, pick_device
    from .tokenizer import load_tokenizer_for

    path = find_checkpoint(ckpt)
    dev = pick_device(device)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown precision {dtype!r} (fp32, bf16, fp16)")
    model = load_model(path, device=dev, dtype=DTYPES[dtype])
    model.eval()
    tokenizer = load_tokenizer_for(path)
    try:
        _specials(tokenizer)
    except UserError:
        raise UserError(f"{path}: this checkpoint's tokenizer has no chat tokens; fine-tune it first "
                        f"(pocketgpt sft --init {path} --data ...)") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}")
    return model, tokenizer


def _command(session: ChatSession, line: str, interactive: bool) -> bool:
    """Run a /command; return False to quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    say = (lambda s: print(s, file=sys.stderr)) if interactive else (lambda s: None)
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/reset":
        session.reset()
        say("(conversation reset)")
    elif cmd == "/system":
        session.system = arg or None
        say(f"(system message {'set' if arg else 'removed'})")
    elif cmd == "/temperature":
        try:
            t = float(arg)
            if t < 0 or t != t:
                raise ValueError
        except ValueError:
            print(f"/temperature: expected a number >= 0, got {arg!r}", file=sys.stderr)
            return True
        session.temperature = t
        say(f"(temperature {t:g})")
    elif cmd == "/history":
        conv = session.conversation()
        if not conv:
            print("(empty conversation)", file=sys.stderr)
        for m in conv:
            print(f"[{m['role']}] {m['content']}", file=sys.stderr)
    elif cmd == "/help":
        print(HELP, file=sys.stderr)
    else:
        print(f"unknown command {cmd} (try /help)", file=sys.stderr)
    return True


def terminal(session: ChatSession, banner: Optional[str] = None) -> None:
    """The chat loop. With a ``banner`` (stdin is a terminal): prompts, notes and command output on stderr, line
    editing. Without: one user message per input line, one reply per output line (newlines -> spaces)."""
    interactive = banner is not None
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input(), wide characters included
        except ImportError:
            pass
        print(banner, file=sys.stderr)
    lines = sys.stdin if interactive else io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    while True:
        try:
            line = input("you> ") if interactive else next(lines, None)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:
            if interactive:
                print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, interactive):
                return
            continue
        if interactive:
            sys.stdout.write("bot> ")
            sys.stdout.flush()
        try:
            for piece in session.reply(line):
                sys.stdout.write(piece if interactive else piece.replace("\r", " ").replace("\n", " "))
                sys.stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        for note in session.notes if interactive else ():
            print(note, file=sys.stderr)
        session.notes.clear()
