"""Token shards: ``prepare`` cuts text / JSONL into documents and writes ``DIR/{train,val[,test]}.bin`` + ``meta.json``
+ ``tokenizer/`` (never importing torch); ``TokenShards`` streams training windows from them (docs/internals.md)."""

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
from .io import atomic_dir, read_json, write_json
from .records import ASSETS, JSONL_SUFFIXES, builtin_path, expand_inputs, read, read_text_file, split as _split
from .tokenizer import Tokenizer, load_tokenizer_for

PREPARE_FORMAT = 2  # 2: documents split by records.split
_SENT_ZH = re.compile(r"([。！？…]+[”’」』\"')）]*)")
_SENT_EN = re.compile(r"([.!?]+[\"')\]]*)\s+")


def _clean_lines(text: str, split_sentences: bool = False) -> list[str]:
    """Whitespace runs inside a line become one space, empty lines go; optionally one sentence per line."""
    lines = [" ".join(line.split()) for line in text.split("\n")]
    if split_sentences:
        lines = [s for line in lines for s in _SENT_EN.sub(r"\1\n", _SENT_ZH.sub(r"\1\n", line)).split("\n")]
    return [s.strip() for s in lines if s.strip()]


def text_documents(text: str, split_sentences: bool = False) -> list[str]:
    """Documents of a plain text: blank-line-separated blocks, or single lines when the text has no blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n[ \t\u3000]*\n", text)
    docs = ["\n".join(_clean_lines(b, split_sentences)) for b in (blocks if len(blocks) > 1 else text.split("\n"))]
    return [d for d in docs if d]


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{where}: record has no field {field!r} (choose it with --field)")
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return "\n".join(m["content"] for m in value)  # a list of chat messages
    raise UserError(f"{where}: field {field!r} is neither a string nor a list of messages")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resolve_sources(inputs: Sequence[str | os.PathLike], builtins: Sequence[str]) -> list[tuple[str, Path]]:
    """(display name, file) for every input file, builtins first."""
    sources = []
    for name in builtins:
        base = builtin_path(name)
        for f in expand_inputs([base]):
            sources.append((f"builtin:{name}" + ("" if f == base else f"/{f.relative_to(base).as_posix()}"), f))
    sources += [(str(f), f) for f in expand_inputs(inputs)]
    if not sources:
        raise UserError("no inputs: give FILES / folders or --builtin NAME")
    return sources


def collect_documents(inputs: Sequence[str | os.PathLike], builtins: Sequence[str] = (), field: str = "text",
                      encoding: str = "utf-8", errors: str = "strict", split_sentences: bool = False,
                      raw: bool = False) -> tuple[list[str], list[dict]]:
    """(documents, sources ``{"path", "sha256", "bytes", "documents"}``) of every input, cleaned unless ``raw``."""
    docs, sources = [], []
    for display, path in _resolve_sources(inputs, builtins):
        if path.name.lower().endswith(JSONL_SUFFIXES):
            bundled_chat = display.startswith("builtin:") and path.is_relative_to(ASSETS / "chat")
            f = "messages" if bundled_chat and field == "text" else field  # a chat corpus as pretraining text
            texts = read(path, lambda record, where: _record_text(record, f, where), encoding=encoding, errors=errors)
            new = [t if raw else "\n".join(_clean_lines(t, split_sentences)) for t in texts]
        else:
            text = read_text_file(path, encoding, errors)
            new = [text] if raw else text_documents(text, split_sentences)
        new = [d for d in new if d]
        docs.extend(new)
        sources.append({"path": display, "sha256": _sha256(path), "bytes": path.stat().st_size, "documents": len(new)})
    if not docs:
        names = ", ".join(s["path"] for s in sources)
        raise UserError(f"{names}: the corpus is empty after cleaning (no non-blank text)")
    return docs, sources


def _split_documents(docs: list[str], val_fraction: float, test_fraction: float, seed: int, tail: bool,
                     raw: bool) -> list[list[str]]:
    """Train, val and test documents by ``records.split`` (val / test get at least one when their fraction is > 0);
    ``raw``: the one text cut by characters, train | val | test with nothing between them (nanoGPT's)."""
    if raw:
        train, held = _split("".join(docs), val_fraction + test_fraction, tail=True)
        val, test = _split(held, test_fraction / (val_fraction + test_fraction), tail=True) if test_fraction \
            else (held, "")
        return [[train], [val], [test]]
    n_val, n_test = (max(1, round(len(docs) * f)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    if n_val + n_test >= len(docs):
        raise UserError(f"only {len(docs)} document(s): too few for a train/val/test split; add text or pass "
                        f"--val-fraction 0 --test-fraction 0")
    held, test = (set(_split(range(len(docs)), seed=seed, count=k, tail=tail)[1]) for k in (n_val + n_test, n_test))
    labels = [2 if i in test else 1 if i in held else 0 for i in range(len(docs))]  # test ⊂ held
    return [[d for d, lab in zip(docs, labels) if lab == k] for k in range(3)]


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, tokenizer: str | os.PathLike | Any = None,
            *, builtins: Sequence[str] = (), field: str = "text", val_fraction: float = 0.1,
            test_fraction: float = 0.0, seed: int = 1337, split_sentences: bool = False, encoding: str = "utf-8",
            errors: str = "strict", kind: str = "bpe", vocab_size: int | None = None, split: str = "random",
            raw: bool = False, force: bool = False, verbose: bool = True) -> dict:
    """Tokenise ``inputs`` (+ ``builtins``) into shards in ``out`` and return the meta dict; ``tokenizer`` (a directory
    or a ``Tokenizer``) None trains a ``kind`` / ``vocab_size`` one. Same inputs, options and tokenizer: a no-op."""
    out = Path(out)
    log = (lambda msg: print(msg, file=sys.stderr)) if verbose else (lambda msg: None)
    if raw and split != "tail":
        raise UserError("--raw keeps the text in one piece, which only a contiguous split can cut: add --split tail")
    for name, frac in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise UserError(f"{name}: must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError("--val-fraction + --test-fraction must leave documents for training (sum < 1)")
    tok = tokenizer if tokenizer is None or isinstance(tokenizer, Tokenizer) else load_tokenizer_for(tokenizer)
    if tok is not None and "<|endoftext|>" not in tok.special_ids:
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
        size = np.dtype(old["dtype"]).itemsize
        complete = (out / "tokenizer" / "tokenizer.json").is_file() and all(
            (out / f"{s}.bin").is_file() and (out / f"{s}.bin").stat().st_size == n * size
            for s, n in old["counts"].items())
        if old.get("fingerprint") == fingerprint and complete:
            log(f"{out}: already prepared from these inputs (nothing to do)")
            return old
        old_tok = old.get("tokenizer") or {}
        # a tokenizer trained here again, with the same settings, counts as the same one
        same_tok = old_tok.get("sha256") == tok.fingerprint if tok else old_tok.get("trained_by_prepare") and \
            (old.get("options") or {}).get("train_tokenizer") == options["train_tokenizer"]
        if not same_tok and not force:
            raise UserError(f"{out}: holds shards made with another tokenizer; choose another --out or pass --force")

    docs, source_meta = collect_documents(inputs, builtins, field, encoding, errors, split_sentences, raw)
    groups = _split_documents(docs, val_fraction, test_fraction, seed, split == "tail", raw)
    trained = tok is None
    if trained:
        # trained on every document (as nanoGPT's char level does) so val/test hold no unknown characters
        log(f"training a {kind} tokenizer (vocab {vocab_size or 'all characters'}) on {len(docs)} documents")
        tok = Tokenizer.train(kind, docs, vocab_size)
    dtype, eos = shard_dtype(tok.vocab_size), tok.eos_id
    splits = ["train", "val"] + (["test"] if test_fraction > 0 else [])

    from tqdm import tqdm

    bar = tqdm(total=sum(map(len, docs)), desc=f"tokenizing {len(docs)} documents", unit="char", unit_scale=True,
               file=sys.stderr, leave=False, disable=not sys.stderr.isatty() or bool(os.environ.get("CI")))
    counts, documents = {}, {}
    with atomic_dir(out) as tmp:
        for name, mine in zip(splits, groups):
            with open(tmp / f"{name}.bin", "wb") as f:
                for batch in (mine[i:i + 1024] for i in range(0, len(mine), 1024)):  # bounded memory
                    flat: list[int] = []
                    for ids in tok.encode_batch(batch):
                        flat += ids if raw else [eos, *ids]  # every document starts with <|endoftext|>
                    np.array(flat, np.dtype(dtype).newbyteorder("<")).tofile(f)
                    bar.update(sum(map(len, batch)))
                counts[name], documents[name] = f.tell() // np.dtype(dtype).itemsize, len(mine)
        bar.close()
        tok.write_files(tmp / "tokenizer")
        meta = {"format": PREPARE_FORMAT, "dtype": dtype, "vocab_size": tok.vocab_size,
                "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "sha256": tok.fingerprint,
                              "special_ids": tok.special_ids, "eos_id": eos,
                              "source": None if trained else str(tokenizer), "trained_by_prepare": trained},
                "counts": counts, "documents": documents, "sources": source_meta, "options": options,
                "fingerprint": fingerprint}
        write_json(tmp / "meta.json", meta)
    log(f"wrote {out}: " + ", ".join(f"{s} {counts[s]:,} tokens ({documents[s]:,} docs)" for s in splits)
        + f", {dtype}, vocab {tok.vocab_size}")
    return meta


def check_tokenizer(ckpt: str | os.PathLike, data_dir: str | os.PathLike, fix: str | None = None) -> None:
    """Refuse, in one line, a model paired with data prepared by another tokenizer (its ids would mean other text);
    passes when either side has no tokenizer to compare. ``fix`` says what to do instead."""
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


def read_meta(directory: str | os.PathLike, where: str = "") -> dict:
    """``DIR/meta.json`` as ``prepare`` wrote it; ``where`` names the option that gave ``directory``."""
    where = where or str(directory)
    if not str(directory):
        raise UserError(f"{where}: no data directory given (make one with 'pocketgpt prepare')")
    path = Path(directory) / "meta.json"
    if not path.parent.is_dir():
        raise UserError(f"{where}: data directory {path.parent} not found (make it with 'pocketgpt prepare')")
    if not path.is_file():
        raise UserError(f"{directory}: not a prepared data directory (no meta.json); run 'pocketgpt prepare'")
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("counts"), dict) \
            or meta.get("dtype") not in ("uint16", "uint32"):
        raise UserError(f"{path}: not a pocketgpt shard description")
    return meta


def _existing_meta(out: Path) -> dict | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if (out / "meta.json").is_file():
        return read_meta(out)
    if any(out.iterdir()):
        raise UserError(f"{out}: directory is not empty and holds no prepared shards (meta.json); choose another --out")
    return None


class TokenShards:
    """Windows of ``block_size`` tokens of one split, through a memmap (no full copy); ``len()``: its tokens."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", block_size: int = 256):
        directory = Path(directory)
        meta = read_meta(directory)
        self.block_size = int(block_size)
        path = directory / f"{split}.bin"
        counts = meta["counts"]
        if not path.is_file():
            raise UserError(f"{directory}: has no {split!r} split (available: {', '.join(sorted(counts)) or 'none'})")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        n = path.stat().st_size // dtype.itemsize
        if split in counts and counts[split] != n:
            raise UserError(f"{path}: holds {n} tokens but meta.json says {counts[split]} (incomplete copy?)")
        if n < self.block_size + 1:
            raise UserError(f"{path}: the {split} split has {n} tokens, fewer than block_size + 1 = "
                            f"{self.block_size + 1}; use a smaller block_size or more data")
        self.data = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        self.num_windows = (n - 1) // self.block_size  # the non-overlapping windows of iter_eval

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def _windows(self, starts) -> tuple:
        import torch

        chunk = torch.from_numpy(np.stack([self.data[i:i + self.block_size + 1].astype(np.int64) for i in starts]))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def get_batch(self, batch_size: int, generator=None):
        """``batch_size`` random windows: ``(x, y)`` int64 tensors ``(batch_size, block_size)``, y shifted by one."""
        import torch

        return self._windows(torch.randint(len(self) - self.block_size, (batch_size,), generator=generator).tolist())

    def iter_eval(self, batch_size: int, max_batches: int | None = None):
        """Non-overlapping windows in order, ``batch_size`` at a time (the last batch may be smaller); with
        ``max_batches``, that many batches spread evenly over the split, so a few estimate the whole split's loss."""
        starts = list(range(0, self.num_windows * self.block_size, self.block_size))
        k = (max_batches or len(starts)) * batch_size
        if k < len(starts):
            starts = [starts[i * len(starts) // k] for i in range(k)]
        for i in range(0, len(starts), batch_size):
            yield self._windows(starts[i:i + batch_size])
