"""Data preparation: raw text / JSONL → token shards, and the loader a trainer streams windows from.

Shard directory (written by ``prepare`` / ``pocketgpt prepare``, atomically)::

    DIR/train.bin, DIR/val.bin [, DIR/test.bin]   flat little-endian uint16 token ids (uint32 when vocab > 65,535)
    DIR/meta.json                                  dtype, vocab_size, tokenizer, counts, documents, sources (sha256)
    DIR/tokenizer/                                 a copy of the tokenizer

Every document starts with ``<|endoftext|>`` (so documents are separated by it, and a document starts like a chat
rendered by ``chat.render``).

What is a document: in a ``.txt`` file with blank lines, each blank-line-separated block (a speech in Tiny
Shakespeare); in a ``.txt`` file without blank lines, each line (a section of 水浒传); in a ``.jsonl`` file, each line
(its ``--field``: a string, or a list of chat messages whose contents are joined by newlines). Whitespace runs inside
a line become one space, lines are stripped, empty lines dropped. Documents go to train / val / test by a seeded
random permutation, so the split is deterministic; ``split="tail"`` holds out the last documents instead.

``raw=True`` (``--raw``, with ``--split tail``) keeps the text byte-for-byte: no cleaning, no ``<|endoftext|>``; the
inputs are concatenated (a text file whole, a JSONL record's field as is) and the last fraction of the characters
is val (then test), nanoGPT's ``data/shakespeare_char/prepare.py``.

Bundled corpora (``builtin_path(name)``; ``builtin_files(name)`` lists the files of a folder entry):

==============  ====================================================  ==============================
name            what                                                  path under ``assets/``
==============  ====================================================  ==============================
shakespeare     Tiny Shakespeare, complete (1.1 MB)                   ``shakespeare.txt``
shuihu          水浒传, complete (gzip)                                ``shuihu.txt.gz``
chat            every chat sample below (folder)                      ``chat/``
chat_en         English chat samples (folder)                         ``chat/en/``
chat_zh         Chinese chat samples (folder)                         ``chat/zh/``
chatterbot_en   ChatterBot English Q/A, 400 conversations             ``chat/en/chatterbot_en.jsonl``
chatterbot_zh   ChatterBot Chinese Q/A, 300 conversations             ``chat/zh/chatterbot_zh.jsonl``
dolly           Dolly-15k open_qa, 300 single-turn records            ``chat/en/dolly_openqa.jsonl``
chitchat        BYU chit-chat, 100 long conversations (gzip)          ``chat/en/chitchat.jsonl.gz``
kdconv          KdConv (film/music/travel), 80 conversations          ``chat/zh/kdconv.jsonl``
prefs           HH-RLHF harmless-base test, 300 preference pairs      ``prefs/hh_rlhf_harmless.jsonl.gz``
==============  ====================================================  ==============================

Chat files hold ``{"messages": [{"role", "content"}, ...]}`` per line, preference files
``{"prompt": [messages], "chosen": str, "rejected": str}``; ``pocketgpt.records`` reads and checks them (and every
other input). Licenses: ``assets/LICENSES/``, sources and sampling: ``assets/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError
from .io import atomic_dir, read_json
from .records import ASSETS, BUILTINS, JSONL_SUFFIXES, builtin_path, expand_inputs, read, read_text_file, suffix
from .records import split as _split

PREPARE_FORMAT = 2  # 2: documents split by records.split


# ---------------------------------------------------------------------- cleaning and documents
_SENT_ZH = re.compile(r"([。！？…]+[”’」』\"')）]*)")
_SENT_EN = re.compile(r"([.!?]+[\"')\]]*)\s+")


def _clean_lines(text: str, split_sentences: bool = False) -> list[str]:
    """Normalise whitespace in each line, drop empty lines, optionally put each sentence on its own line."""
    out = []
    for line in text.split("\n"):
        line = " ".join(line.split())
        if not line:
            continue
        if split_sentences:
            line = _SENT_EN.sub(r"\1\n", _SENT_ZH.sub(r"\1\n", line))
            out.extend(s.strip() for s in line.split("\n") if s.strip())
        else:
            out.append(line)
    return out


def text_documents(text: str, split_sentences: bool = False) -> list[str]:
    """Documents of a plain text: blank-line-separated blocks, or single lines when the text has no blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n[ \t\u3000]*\n", text)
    if len(blocks) == 1:
        blocks = text.split("\n")
    docs = []
    for block in blocks:
        lines = _clean_lines(block, split_sentences)
        if lines:
            docs.append("\n".join(lines))
    return docs


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{where}: record has no field {field!r} (choose it with --field)")
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return "\n".join(m["content"] for m in value)  # a list of chat messages
    raise UserError(f"{where}: field {field!r} is neither a string nor a list of messages")


def jsonl_documents(path: Path, field: str = "text", encoding: str = "utf-8", errors: str = "strict",
                    split_sentences: bool = False, raw: bool = False) -> list[str]:
    """One document per JSONL line (its ``field``), cleaned like text (unless ``raw``)."""
    docs = []
    for lineno, record in read(path, encoding=encoding, errors=errors):
        text = _record_text(record, field, f"{path}:{lineno}")
        lines = [text] if raw else _clean_lines(text, split_sentences)
        if lines and lines[0]:
            docs.append("\n".join(lines))
    return docs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_sources(inputs: Sequence[str | os.PathLike], builtins: Sequence[str]) -> list[tuple[str, Path]]:
    """(display name, file) for every input file, builtins first."""
    sources = []
    for name in builtins:
        base = builtin_path(name)
        for f in expand_inputs([base]):
            sources.append((f"builtin:{name}" + ("" if f == base else f"/{f.relative_to(base).as_posix()}"), f))
    sources.extend((str(f), f) for f in expand_inputs(inputs))
    if not sources:
        raise UserError("no inputs: give FILES / folders or --builtin NAME")
    return sources


def collect_documents(inputs: Sequence[str | os.PathLike], builtins: Sequence[str] = (), field: str = "text",
                      encoding: str = "utf-8", errors: str = "strict", split_sentences: bool = False,
                      raw: bool = False) -> tuple[list[str], list[dict]]:
    """Read and clean (unless ``raw``: a text file is one document, as is) every input; returns (documents, sources)
    where sources are ``{"path", "sha256", "bytes", "documents"}``. Bundled chat corpora are read with field
    ``messages``."""
    docs: list[str] = []
    sources = []
    for display, path in _resolve_sources(inputs, builtins):
        if suffix(path) in JSONL_SUFFIXES:
            bundled_chat = display.startswith("builtin:") and path.is_relative_to(ASSETS / "chat")
            f = "messages" if bundled_chat and field == "text" else field
            new = jsonl_documents(path, f, encoding, errors, split_sentences, raw)
        else:
            text = read_text_file(path, encoding, errors)
            new = ([text] if text else []) if raw else text_documents(text, split_sentences)
        docs.extend(new)
        sources.append({"path": display, "sha256": _sha256(path), "bytes": path.stat().st_size, "documents": len(new)})
    if not docs:
        names = ", ".join(s["path"] for s in sources)
        raise UserError(f"{names}: the corpus is empty after cleaning (no non-blank text)")
    return docs, sources


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, frac in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise UserError(f"{name}: must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError("--val-fraction + --test-fraction must leave documents for training (sum < 1)")


def split_documents(n_docs: int, val_fraction: float, test_fraction: float, seed: int,
                    tail: bool = False) -> np.ndarray:
    """Split label per document (0 train, 1 val, 2 test) from a seeded permutation (``tail``: the last documents are
    val, then test); val/test get at least one document each when their fraction is > 0 (and at least one stays for
    training)."""
    _check_fractions(val_fraction, test_fraction)
    n_val = max(1, round(n_docs * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n_docs * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= n_docs:
        raise UserError(f"only {n_docs} document(s): too few for a train/val/test split; add text or pass "
                        f"--val-fraction 0 --test-fraction 0")
    held, test = (list(_split(range(n_docs), seed=seed, count=k, tail=tail)[1]) for k in (n_val + n_test, n_test))
    labels = np.zeros(n_docs, dtype=np.int8)
    labels[held] = 1  # test ⊂ held
    labels[test] = 2
    return labels


# ---------------------------------------------------------------------- prepare
def _progress(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty() or bool(os.environ.get("CI")))


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, tokenizer: str | os.PathLike | Any = None,
            *, builtins: Sequence[str] = (), field: str = "text", val_fraction: float = 0.1,
            test_fraction: float = 0.0, seed: int = 1337, split_sentences: bool = False, encoding: str = "utf-8",
            errors: str = "strict", kind: str = "bpe", vocab_size: int | None = None, split: str = "random",
            raw: bool = False, batch_docs: int = 1024, force: bool = False, verbose: bool = True) -> dict:
    """Tokenise ``inputs`` (+ ``builtins``) into shards in ``out``; returns the meta dict.

    ``tokenizer`` is a directory (or a ``Tokenizer``); if None, one of ``kind`` / ``vocab_size`` is trained on the
    training documents and saved into ``out/tokenizer/``. ``split``: ``random`` (seeded, by document) or ``tail``;
    ``raw`` keeps the text as is (module docstring). Re-running with the same inputs, options and tokenizer does
    nothing. An ``out`` holding shards of a different tokenizer is an error unless ``force``.
    """
    from .tokenizer import Tokenizer, load_tokenizer_for

    out = Path(out)
    log = (lambda msg: print(msg, file=sys.stderr)) if verbose else (lambda msg: None)
    if errors not in ("strict", "replace"):
        raise UserError(f"--errors: must be strict or replace, got {errors!r}")
    if split not in ("random", "tail"):
        raise UserError(f"--split: must be random or tail, got {split!r}")
    if raw and split != "tail":
        raise UserError("--raw keeps the text in one piece, which only a contiguous split can cut: add --split tail")
    tok = None
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer_for(tokenizer)
        if "<|endoftext|>" not in tok.special_ids:
            raise UserError(f"{tokenizer}: the tokenizer has no <|endoftext|> token to separate documents")
    sources = _resolve_sources(inputs, builtins)
    options = dict(field=field, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                   split_sentences=split_sentences, encoding=encoding, errors=errors)
    if split != "random" or raw:  # only when set, so shards prepared before these options stay valid
        options.update(split=split, raw=raw)
    if tok is None:
        options.update(train_tokenizer=dict(kind=kind, vocab_size=vocab_size))
    fingerprint = hashlib.sha256(json.dumps(
        dict(format=PREPARE_FORMAT, options=options, tokenizer=tok.fingerprint if tok else None,
             sources=[(d, _sha256(p)) for d, p in sources]), sort_keys=True).encode()).hexdigest()

    old = _existing_meta(out)
    if old is not None:
        old_tok = old.get("tokenizer") or {}
        if tok is None:  # a tokenizer trained here again, with the same settings, counts as the same one
            same_tok = bool(old_tok.get("trained_by_prepare")) and \
                (old.get("options") or {}).get("train_tokenizer") == options["train_tokenizer"]
        else:
            same_tok = old_tok.get("sha256") == tok.fingerprint
        if old.get("fingerprint") == fingerprint and _shards_complete(out, old):
            log(f"{out}: already prepared from these inputs (nothing to do)")
            return old
        if not same_tok and not force:
            raise UserError(f"{out}: holds shards made with another tokenizer; choose another --out or pass --force")

    docs, source_meta = collect_documents(inputs, builtins, field, encoding, errors, split_sentences, raw)
    if raw:  # one text cut by characters: train | val | test, nothing between them
        _check_fractions(val_fraction, test_fraction)
        text, held = _split("".join(docs), val_fraction + test_fraction, tail=True)
        docs = [text, *(_split(held, test_fraction / (val_fraction + test_fraction), tail=True) if test_fraction
                        else [held])]
        labels = np.arange(len(docs), dtype=np.int8)
    else:
        labels = split_documents(len(docs), val_fraction, test_fraction, seed, tail=split == "tail")
    trained = False
    if tok is None:
        # trained on every document (as nanoGPT's char level does) so val/test hold no unknown characters
        log(f"training a {kind} tokenizer (vocab {vocab_size or 'all characters'}) on {len(docs)} documents")
        if kind != "char" and vocab_size is None:
            raise UserError("--vocab-size: required to train a tokenizer (or pass --tokenizer DIR)")
        tok = Tokenizer.train(kind, docs, vocab_size)
        trained = True
    dtype = shard_dtype(tok.vocab_size)
    eos = tok.eos_id

    splits = ["train", "val"] + (["test"] if test_fraction > 0 else [])
    parts: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    ndocs = {0: 0, 1: 0, 2: 0}
    bar = _progress(sum(len(d) for d in docs), f"tokenizing {len(docs)} documents", "char")
    for start in range(0, len(docs), batch_docs):
        batch = docs[start:start + batch_docs]
        flat: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for ids, lab in zip(tok.encode_batch(batch), labels[start:start + batch_docs].tolist()):
            if not raw:
                flat[lab].append(eos)
            flat[lab].extend(ids)
            ndocs[lab] += 1
        for lab, ids in flat.items():
            if ids:
                parts[lab].append(np.array(ids, dtype=dtype))
        bar.update(sum(len(d) for d in batch))
    bar.close()

    counts, documents = {}, {}
    with atomic_dir(out) as tmp:
        for i, name in enumerate(splits):
            arr = np.concatenate(parts[i]) if parts[i] else np.zeros(0, dtype=dtype)
            arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(tmp / f"{name}.bin")
            counts[name] = int(arr.size)
            documents[name] = ndocs[i]
        tok.write_files(tmp / "tokenizer")
        meta = {
            "format": PREPARE_FORMAT,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "sha256": tok.fingerprint,
                          "special_ids": tok.special_ids, "eos_id": eos,
                          "source": None if trained else str(tokenizer), "trained_by_prepare": trained},
            "counts": counts,
            "documents": documents,
            "sources": source_meta,
            "options": options,
            "fingerprint": fingerprint,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {out}: " + ", ".join(f"{s} {counts[s]:,} tokens ({documents[s]:,} docs)" for s in splits)
        + f", {dtype}, vocab {tok.vocab_size}")
    return meta


def check_tokenizer(ckpt: str | os.PathLike, data_dir: str | os.PathLike, fix: str | None = None) -> None:
    """Refuse, in one line, a model paired with data prepared by another tokenizer (its ids would mean other text).

    Compares the fingerprint in ``DATA/meta.json`` with the checkpoint's tokenizer (``CKPT/tokenizer/``); passes
    when either side has nothing to compare. ``fix`` says what to do instead (default: prepare the data again with
    the checkpoint's tokenizer)."""
    from .tokenizer import load_tokenizer_for

    meta_path = Path(data_dir) / "meta.json"
    recorded = (read_json(meta_path).get("tokenizer") or {}) if meta_path.is_file() else {}
    if not recorded.get("sha256"):
        return
    try:
        tok = load_tokenizer_for(ckpt)
    except UserError:  # a bare model directory: nothing to compare
        return
    if tok.fingerprint != recorded["sha256"]:
        fix = fix or f"prepare the data with --tokenizer {ckpt}"
        raise UserError(f"{ckpt} uses another tokenizer ({tok.kind}, {tok.vocab_size} ids) than {data_dir} was "
                        f"prepared with ({recorded.get('kind')}, {recorded.get('vocab_size')} ids, {meta_path}): "
                        f"{fix}")


def _existing_meta(out: Path) -> dict | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if not (out / "meta.json").is_file():
        if any(out.iterdir()):
            raise UserError(f"{out}: directory is not empty and holds no prepared shards (meta.json); "
                            f"choose another --out")
        return None
    meta = read_json(out / "meta.json")
    if not isinstance(meta, dict) or "counts" not in meta:
        raise UserError(f"{out / 'meta.json'}: not a pocketgpt shard description")
    return meta


def _shards_complete(out: Path, meta: dict) -> bool:
    try:
        size = np.dtype(meta["dtype"]).itemsize
        return all((out / f"{s}.bin").stat().st_size == n * size for s, n in meta["counts"].items()) and \
            (out / "tokenizer" / "tokenizer.json").is_file()
    except (OSError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------- loading shards
class TokenShards:
    """Windows of ``block_size`` tokens from one split of a shard directory, read through a memmap (no full copy).

    ``get_batch(batch_size, generator)`` → ``(x, y)`` int64 tensors ``(B, block_size)`` at random offsets
    (``y`` is ``x`` shifted by one); ``iter_eval(batch_size, max_batches)`` → the same from non-overlapping windows
    (deterministic): all of them in order, or ``max_batches`` batches of windows spread evenly over the split. ``len(shards)`` is the number of tokens in the split.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train", block_size: int = 256):
        self.dir = Path(directory)
        if not (self.dir / "meta.json").is_file():
            raise UserError(f"{self.dir}: not a prepared data directory (no meta.json); run 'pocketgpt prepare'")
        self.meta = read_json(self.dir / "meta.json")
        self.split = split
        self.block_size = int(block_size)
        path = self.dir / f"{split}.bin"
        counts = self.meta.get("counts", {})
        if not path.is_file():
            have = ", ".join(sorted(counts)) or "none"
            raise UserError(f"{self.dir}: has no {split!r} split (available: {have})")
        try:
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        except (KeyError, TypeError):
            raise UserError(f"{self.dir / 'meta.json'}: missing or bad 'dtype'") from None
        n = path.stat().st_size // dtype.itemsize
        if split in counts and counts[split] != n:
            raise UserError(f"{path}: holds {n} tokens but meta.json says {counts[split]} (incomplete copy?)")
        if self.block_size < 1:
            raise UserError(f"block_size: must be >= 1, got {block_size}")
        if n < self.block_size + 1:
            raise UserError(f"{path}: the {split} split has {n} tokens, fewer than block_size + 1 = "
                            f"{self.block_size + 1}; use a smaller block_size or more data")
        self.data = np.memmap(path, dtype=dtype, mode="r", shape=(n,))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def num_windows(self) -> int:
        """How many non-overlapping windows ``iter_eval`` yields in total."""
        return (len(self) - 1) // self.block_size

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def _windows(self, starts) -> tuple:
        import torch

        T = self.block_size
        chunk = np.stack([np.asarray(self.data[i:i + T + 1], dtype=np.int64) for i in starts])
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def get_batch(self, batch_size: int, generator=None):
        """``batch_size`` random windows: ``(x, y)`` int64 CPU tensors of shape ``(batch_size, block_size)``."""
        import torch

        starts = torch.randint(len(self) - self.block_size, (batch_size,), generator=generator).tolist()
        return self._windows(starts)

    def iter_eval(self, batch_size: int, max_batches: int | None = None):
        """Non-overlapping windows of the split in order, ``batch_size`` at a time (the last batch may be smaller); with
        ``max_batches``, that many batches of windows spread evenly over the whole split (not its beginning only, so
        a few batches estimate the whole split's loss)."""
        starts = list(range(0, self.num_windows * self.block_size, self.block_size))
        k = (max_batches or len(starts)) * batch_size
        if k < len(starts):
            starts = [starts[i * len(starts) // k] for i in range(k)]
        for i in range(0, len(starts), batch_size):
            yield self._windows(starts[i:i + batch_size])
