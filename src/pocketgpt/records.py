"""Records: reading and checking every kind of input, the one seeded held-out split and the one truncation rule.

Every reader names ``file:line`` (and the field) in the ``UserError`` of a bad record:

==================  ===============================================================  =============================
kind                one JSONL line                                                   reader
==================  ===============================================================  =============================
text                (``.txt`` / ``.txt.gz``: the whole file)                         ``read_text_file(path)``
any JSONL           any JSON value                                                   ``read(src)`` → (line, value)
conversation        ``{"messages": [{"role", "content"}, ...]}`` with a reply          ``read_conversations(src)``
preference pair     ``{"prompt": [messages], "chosen": str, "rejected": str}``       ``read_pairs(src)``
RL prompt           ``{"messages": [...]}``, ``{"prompt": [...]}`` or ``{"prompt": str}``  ``read_prompts(src)``
==================  ===============================================================  =============================

Roles are ``system``, ``user``, ``assistant``; other keys of a message are dropped. A source (``src``) is a file, a
folder (its ``.jsonl`` / ``.jsonl.gz`` files) or the name of a bundled corpus (``builtin_path``), or a list of them;
``.gz`` files are decompressed. ``skip_bad=True`` skips bad lines and reports their count instead of stopping.

``split(items, fraction, seed)`` is the one seeded train / held-out split (SFT, reward model, DPO, RL prompts, the
documents of ``prepare``); ``tail=True`` holds out the contiguous end instead (``prepare --split tail``). ``fit(prompt, limit, *replies)`` is the one truncation rule of a prompt and its replies
(engine, chat, RL rollouts, reward model, DPO): the replies keep their beginning, the prompt its newest tokens (so
the ``<|assistant|>`` that ends a generation prompt always stays). SFT's conversations are first split at turn
boundaries (``chat.fit_to_context``, the template's side of the same rule). ``pad(rows, value)`` right-pads rows.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTINS = {
    "shakespeare": "shakespeare.txt",
    "shuihu": "shuihu.txt.gz",
    "chat": "chat",
    "chat_en": "chat/en",
    "chat_zh": "chat/zh",
    "chatterbot_en": "chat/en/chatterbot_en.jsonl",
    "chatterbot_zh": "chat/zh/chatterbot_zh.jsonl",
    "dolly": "chat/en/dolly_openqa.jsonl",
    "chitchat": "chat/en/chitchat.jsonl.gz",
    "kdconv": "chat/zh/kdconv.jsonl",
    "prefs": "prefs/hh_rlhf_harmless.jsonl.gz",
}
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
ROLES = ("system", "user", "assistant")


# ---- files -------------------------------------------------------------------------------------------------------------


def builtin_path(name: str) -> Path:
    """Path of a bundled corpus (a file, or a folder for ``chat``, ``chat_en``, ``chat_zh``); see ``pocketgpt.data``."""
    if name not in BUILTINS:
        raise UserError(f"--builtin: unknown corpus {name!r} (choose from {', '.join(BUILTINS)})")
    path = ASSETS / BUILTINS[name]
    if not path.exists():
        raise UserError(f"bundled corpus {name!r} is missing from the installation ({path})")
    return path


def builtin_files(name: str) -> list[Path]:
    """The data files of a bundled corpus (one for a file entry, all of them for a folder entry), sorted."""
    return expand_inputs([builtin_path(name)])


def suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in TEXT_SUFFIXES + JSONL_SUFFIXES if name.endswith(s)), path.suffix.lower())


def expand_inputs(inputs: Sequence[str | os.PathLike], suffixes=TEXT_SUFFIXES + JSONL_SUFFIXES) -> list[Path]:
    """Files and folders → the list of data files (folders searched recursively for ``suffixes``, sorted by name;
    hidden files skipped)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and suffix(p) in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"{path}: folder holds no {', '.join(suffixes[:-1])} or {suffixes[-1]} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def resolve(name: str | os.PathLike) -> list[Path]:
    """The JSONL files of one source: a file, a folder's ``.jsonl`` / ``.jsonl.gz`` files, or a bundled corpus."""
    path = Path(name)
    if not path.exists():
        if str(name) not in BUILTINS:
            raise UserError(f"{name}: no such file, nor a bundled corpus ({', '.join(BUILTINS)})")
        path = builtin_path(str(name))
    return expand_inputs([path], JSONL_SUFFIXES)


def read_text_file(path: str | os.PathLike, encoding: str = "utf-8", errors: str = "strict") -> str:
    """A text file (``.gz`` decompressed) as str, without a BOM; bad bytes are a UserError naming file:line and the
    byte offset."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        text = data.decode(encoding, errors=errors)
    except LookupError:
        raise UserError(f"--encoding: unknown text encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = " (uncompressed)" if path.name.lower().endswith(".gz") else ""
        raise UserError(f"{path}:{line}: not valid {encoding} text at byte {e.start}{where}; pass --encoding ENC "
                        "or --errors replace") from None
    return text[1:] if text.startswith("\ufeff") else text


def read(sources, parse: Optional[Callable[[Any, str], Any]] = None, *, what: Optional[str] = None,
         skip_bad: bool = False, report: Optional[Callable[[str], None]] = None, encoding: str = "utf-8",
         errors: str = "strict") -> list:
    """The one JSONL reader: ``parse(value, "file:line")`` of every non-blank line of every file of ``sources``
    (``(line_number, value)`` without ``parse``), in order.

    A bad line (not JSON, or refused by ``parse`` with a UserError) stops with that error, or with
    ``skip_bad=True`` is skipped and counted through ``report`` (one line of text; default stderr). With ``what``
    (e.g. ``"conversations"``) a file that gives none is an error."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise UserError(f"--data: no {what or 'records'} given (JSONL files or bundled corpus names)")
    out: list = []
    for path in [p for s in sources for p in resolve(s)]:
        bad, before = [], len(out)
        for lineno, line in enumerate(read_text_file(path, encoding, errors).split("\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
                out.append(parse(value, where) if parse else (lineno, value))
            except UserError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
        if bad:
            (report or (lambda s: print(s, file=sys.stderr)))(
                f"{path}: skipped {len(bad)} bad line(s); first: {bad[0]}")
        if what and len(out) == before:
            raise UserError(f"{path}: no {what} in this file" + (f" ({len(bad)} bad lines skipped)" if bad else ""))
    return out


# ---- record kinds ------------------------------------------------------------------------------------------------------


def check_messages(messages, where: str = "messages", *, need_assistant: bool = False) -> list[dict]:
    """A message list (roles system/user/assistant, string content) as plain ``{role, content}`` dicts."""
    if not isinstance(messages, list):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if not messages:
        raise UserError(f"{where}: 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) has no string 'content'")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: conversation has no assistant turn (nothing to train on)")
    return out


def conversation(value, where: str) -> list[dict]:
    """A ``{"messages": [...]}`` record with at least one assistant turn."""
    if not isinstance(value, dict) or "messages" not in value:
        raise UserError(f"{where}: missing 'messages' (expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}})")
    return check_messages(value["messages"], where, need_assistant=True)


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    where: str  # "file:line"


def pair(value, where: str) -> Pair:
    """A preference pair ``{"prompt": [messages], "chosen": str, "rejected": str}`` (non-empty replies)."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    for key in ("prompt", "chosen", "rejected"):
        if key not in value:
            raise UserError(f"{where}: missing '{key}' (expected {{\"prompt\": [messages], \"chosen\": str, "
                            f"\"rejected\": str}})")
    if isinstance(value["prompt"], str):
        raise UserError(f"{where}: 'prompt' must be a list of messages, got a string "
                        f"(use [{{\"role\": \"user\", \"content\": ...}}])")
    prompt = check_messages(value["prompt"], where)
    for key in ("chosen", "rejected"):
        if not isinstance(value[key], str):
            raise UserError(f"{where}: '{key}' must be a string")
        if not value[key].strip():
            raise UserError(f"{where}: '{key}' is empty")
    return Pair(prompt, value["chosen"], value["rejected"], where)


def prompt(value, where: str) -> tuple[list[dict], str]:
    """An RL prompt and its ``file:line``; a conversation that ends in assistant turns (an SFT file) is used up to
    its last user turn."""
    if not isinstance(value, dict) or not ("messages" in value or "prompt" in value):
        raise UserError(f"{where}: expected a 'messages' list or a 'prompt' (list of messages or text)")
    p = value.get("messages", value.get("prompt"))
    if isinstance(p, str):
        if not p.strip():
            raise UserError(f"{where}: 'prompt' is empty")
        p = [{"role": "user", "content": p}]
    msgs = check_messages(p, where)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user message")
    return msgs, where


def read_conversations(sources, **options) -> list[list[dict]]:
    return read(sources, conversation, what="conversations", **options)


def read_pairs(sources, **options) -> list[Pair]:
    return read(sources, pair, what="preference pairs", **options)


def read_prompts(sources, **options) -> tuple[list[list[dict]], list[str]]:
    """RL prompts and their ``file:line`` names."""
    rows = read(sources, prompt, what="prompts", **options)
    return [p for p, _ in rows], [w for _, w in rows]


# ---- the held-out split, the truncation rule, padding ------------------------------------------------------------------


def split(items: Sequence, fraction: float = 0.0, seed: int = 0, *, most: Optional[int] = None,
          count: Optional[int] = None, tail: bool = False) -> tuple[list, list]:
    """The one seeded split: ``(train, held_out)``, each in the order of ``items``; same seed, same split.

    Held out: ``count`` items, or ``round(fraction × n)`` (at least one when ``fraction > 0`` and n ≥ 2), at most
    ``most``; at least one item always stays for training. Which items: the first of a ``random.Random(seed)``
    shuffle, so a larger held-out set contains a smaller one. ``tail=True``: the last items instead, as slices of
    ``items`` (a string stays a string); train keeps the first ``int(n × (1 - fraction))``, nanoGPT's rule."""
    n = len(items)
    if count is None:
        if tail:
            count = n - int(n * (1 - fraction)) if fraction > 0 else 0
        else:
            count = max(1, round(n * fraction)) if fraction > 0 and n >= 2 else round(n * fraction)
    count = max(0, min(count, n - 1, n if most is None else most))
    if tail:
        return items[:n - count], items[n - count:]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def fit(prompt: Sequence[int], limit: int, *replies) -> tuple[list[int], ...]:
    """The one truncation rule: ``(prompt, *replies)`` cut so that the prompt and each reply fit ``limit`` tokens.

    A reply (token ids) keeps its first ``max(limit - len(prompt), limit // 2)`` tokens: it is cut only when the
    prompt needs the rest of the context, and then keeps half of it. An int instead of a reply is the room to keep
    free for a reply still to be written (it is returned as is). The prompt keeps its newest tokens in what the
    longest reply leaves (at least one), so the ``<|assistant|>`` that ends a generation prompt is never cut."""
    budget = max(limit - len(prompt), limit // 2)
    replies = [r if isinstance(r, int) else [int(t) for t in r[:budget]] for r in replies]
    keep = max(1, limit - max((r if isinstance(r, int) else len(r) for r in replies), default=0))
    return ([int(t) for t in prompt[-keep:]], *replies)


def pad(rows: Sequence[Sequence[int]], value: int, width: Optional[int] = None):
    """Right-padded ``(len(rows), width)`` int64 tensor (``width``: the longest row, at least 1)."""
    import torch

    width = width or max(1, max((len(r) for r in rows), default=1))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.tensor([int(t) for t in r], dtype=torch.long)
    return out
