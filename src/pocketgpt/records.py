"""Records: reading and checking every kind of input (``file:line`` in each error), the one seeded held-out split,
the one truncation rule and right-padding; the record kinds are listed in docs/internals.md."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTINS = {  # bundled corpus → its file or folder under assets/ (assets/README.md: sources and licenses)
    "shakespeare": "shakespeare.txt", "shuihu": "shuihu.txt.gz",
    "chat": "chat", "chat_en": "chat/en", "chat_zh": "chat/zh",
    "chatterbot_en": "chat/en/chatterbot_en.jsonl", "chatterbot_zh": "chat/zh/chatterbot_zh.jsonl",
    "dolly": "chat/en/dolly_openqa.jsonl", "chitchat": "chat/en/chitchat.jsonl.gz", "kdconv": "chat/zh/kdconv.jsonl",
    "prefs": "prefs/hh_rlhf_harmless.jsonl.gz"}
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
ROLES = ("system", "user", "assistant")


def builtin_path(name: str) -> Path:
    """Path of a bundled corpus (a file, or a folder for ``chat``, ``chat_en``, ``chat_zh``)."""
    if name not in BUILTINS:
        raise UserError(f"--builtin: unknown corpus {name!r} (choose from {', '.join(BUILTINS)})")
    path = ASSETS / BUILTINS[name]
    if not path.exists():
        raise UserError(f"bundled corpus {name!r} is missing from the installation ({path})")
    return path


def builtin_files(name: str) -> list[Path]:
    """The data files of a bundled corpus (one for a file entry, all of them for a folder entry), sorted."""
    return expand_inputs([builtin_path(name)])


def expand_inputs(inputs: Sequence[str | os.PathLike], suffixes=TEXT_SUFFIXES + JSONL_SUFFIXES) -> list[Path]:
    """Files and folders → data files (a folder's ``suffixes`` files, recursively, sorted, hidden ones skipped)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)
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
    """A text file (``.gz`` decompressed) as str, without a BOM; bad bytes name file:line and the byte offset."""
    path = Path(path)
    gz = path.name.lower().endswith(".gz")
    try:
        data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
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
        raise UserError(f"{path}:{line}: not valid {encoding} text at byte {e.start}{' (uncompressed)' if gz else ''}; "
                        "pass --encoding ENC or --errors replace") from None
    return text[1:] if text.startswith("\ufeff") else text


def read(sources, parse: Callable[[Any, str], Any] | None = None, *, what: str | None = None, skip_bad: bool = False,
         report: Callable[[str], None] | None = None, encoding: str = "utf-8", errors: str = "strict") -> list:
    """``parse(value, "file:line")`` of every non-blank line of every file of ``sources``, in order (without
    ``parse``: ``(line_number, value)``). ``skip_bad``: bad lines are counted through ``report``, not raised; with
    ``what`` (e.g. ``"conversations"``) a file that gives none is an error."""
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
        raise UserError(f'{where}: missing \'messages\' (expected {{"messages": [{{"role": ..., "content": ...}}]}})')
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
    """An RL prompt and its ``file:line``; a conversation (an SFT file) is used up to its last user turn."""
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


def split(items: Sequence, fraction: float = 0.0, seed: int = 0, *, most: int | None = None,
          count: int | None = None, tail: bool = False) -> tuple[list, list]:
    """``(train, held_out)`` in the order of ``items``: ``count`` (or ``round(fraction × n)``, ≥ 1 if fraction > 0,
    ≤ ``most``) held out, ≥ 1 kept; the first of a seeded shuffle, so a larger held-out set contains a smaller one.
    ``tail``: the last items as slices (a string stays a string), train keeping ``int(n × (1 - fraction))``."""
    n = len(items)
    if count is None:
        count = n - int(n * (1 - fraction)) if tail else max(1 if fraction > 0 else 0, round(n * fraction))
    count = max(0, min(count, n - 1, n if most is None else most))
    if tail:
        return items[:n - count], items[n - count:]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def fit(prompt: Sequence[int], limit: int, *replies) -> tuple[list[int], ...]:
    """``(prompt, *replies)`` cut so that the prompt and each reply fit ``limit``: a reply keeps its first
    ``max(limit - len(prompt), limit // 2)`` tokens, the prompt its newest (the ``<|assistant|>`` that ends a generation
    prompt stays) in what the longest reply leaves; an int is the room for a reply still to be written."""
    budget = max(limit - len(prompt), limit // 2)
    replies = [r if isinstance(r, int) else [int(t) for t in r[:budget]] for r in replies]
    keep = max(1, limit - max((r if isinstance(r, int) else len(r) for r in replies), default=0))
    return ([int(t) for t in prompt[-keep:]], *replies)


def pad(rows: Sequence[Sequence[int]], value: int, width: int | None = None):
    """Right-padded ``(len(rows), width)`` int64 tensor (``width``: the longest row, at least 1)."""
    import torch

    width = width or max(1, max((len(r) for r in rows), default=1))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out
