"""Tokenizers (4 kinds) over Hugging Face ``tokenizers``, see docs/internals.md; encoding takes exact faster paths where
they apply: tiktoken's core for a GPT-2-style BPE, a numpy table for char (``POCKETGPT_TOKENIZER_BACKEND=hf``: off)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from .errors import UserError
from .io import atomic_dir, read_json, write_json
from .records import read_text_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TOKENS = [t for t in SPECIAL_TOKENS if t != "<|pad|>"]  # what the chat template needs
UNK = "<unk>"
KINDS = ("bpe", "unigram", "char", "word")
META_FILE = "pocketgpt_tokenizer.json"
TOKENIZER_FILES = {"tokenizer.json", META_FILE, "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json"}

# The Jinja twin of ``chat.render`` for exported tokenizers (the tests compare both on every tokenizer kind)
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role'] + ' (expected system, user or assistant)') }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
# GPT-2's pre-tokenizer split (what HF's ByteLevel(use_regex=True) applies)
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# words (a leading space attached), each Chinese character alone, single punctuation marks, whitespace runs
_WORD_PATTERN = r"\p{Han}| ?[[\w']&&[^\p{Han}]]+| ?[^\w\s]|\s+(?!\S)|\s+"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(moved)) for b in range(256)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _text(item) -> str:
    """A training text: a ``Path`` (or a string naming an existing file) is read, another string used as it is."""
    if isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.isfile(item)):
        return read_text_file(item)
    if not isinstance(item, str):
        raise UserError(f"tokenizer training input must be a path or a string, got {type(item).__name__}")
    return item


class Tokenizer:
    """A trained or loaded tokenizer (``kind``: bpe / unigram / char / word, or gpt2 / hf when loaded); plain text never
    gives a special id: ``encode("<|user|>")`` encodes the characters, ``encode(text, allow_special=True)`` the id."""

    def __init__(self, hf: HFTokenizer, kind: str = "hf"):
        self.kind = kind
        self._hf = hf  # encodes the special strings as special ids
        self._hf.encode_special_tokens = False
        self._plain = HFTokenizer.from_str(hf.to_str())  # encodes them as ordinary text
        self._plain.encode_special_tokens = True
        fast = os.environ.get("POCKETGPT_TOKENIZER_BACKEND", "auto") != "hf"
        self._tt = _tiktoken_core(hf) if fast else None  # byte-level BPE through tiktoken's core
        self._chars = _char_table(hf) if fast and kind == "char" else None  # char level through numpy

    @classmethod
    def train(cls, kind: str, files_or_texts: Iterable[str | os.PathLike], vocab_size: int | None = None, *,
              min_frequency: int = 0, show_progress: bool = False) -> "Tokenizer":
        """Train on files and/or texts; ``vocab_size`` counts the special tokens (None for char: every character)."""
        if kind not in KINDS:
            raise UserError(f"--kind: unknown tokenizer kind {kind!r} (choose from {', '.join(KINDS)})")
        texts = [t for t in map(_text, files_or_texts) if t]
        if not any(t.strip() for t in texts):
            raise UserError("tokenizer training: the corpus is empty")
        if vocab_size is None and kind != "char":
            raise UserError(f"--vocab-size: required for a {kind} tokenizer")
        n = len(SPECIAL_TOKENS)
        chars = set().union(*map(set, texts)) - ({" "} if kind == "unigram" else set())  # unigram: ▁ is the space
        corpus = f"{len(chars)} distinct characters + {n + 1} special tokens of this corpus"
        # the smallest vocabulary, what it holds, and why a corpus may give fewer ids than asked (a warning)
        need, what, why = {
            "bpe": (256 + n, f"256 byte symbols + {n} special tokens a byte-level BPE needs",
                    "no pair of adjacent tokens is left to merge (every word of the corpus is one token already)"),
            "unigram": (len(chars) + n + 2, corpus, "the corpus has no more pieces worth keeping"),  # + <unk> + ▁
            "char": (len(chars) + n + 1, corpus,
                     "that is every distinct character of the corpus plus the special tokens"),
            "word": (n + 2, f"{n + 1} special tokens",
                     "that is every distinct word of the corpus (at --min-frequency) plus the special tokens")}[kind]
        if vocab_size is not None and vocab_size < need:
            raise UserError(f"--vocab-size: {vocab_size} is below the {what} (minimum {need}"
                            f"{'; or omit it' if kind == 'char' else ''})")

        if kind == "bpe":
            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                          special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        elif kind == "unigram":
            hf = HFTokenizer(models.Unigram())
            hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
            hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
            # the special tokens stay out of the unigram model (it would segment their literal strings as pieces):
            # they are added after training, so they take the last ids
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size - n, special_tokens=[UNK], unk_token=UNK,
                                              show_progress=show_progress)
        elif kind == "char":  # no statistics needed: every character seen, in code point order
            hf = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS + [UNK] + sorted(chars))},
                                              unk_token=UNK))
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            hf.decoder = decoders.Fuse()
            trainer = None
        else:  # word: a word-level model over words, punctuation marks and whitespace runs
            hf = HFTokenizer(models.WordLevel(unk_token=UNK))
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")
            hf.decoder = decoders.Fuse()
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                special_tokens=SPECIAL_TOKENS + [UNK], show_progress=show_progress)
        if trainer is not None:
            try:
                hf.train_from_iterator(texts, trainer)
            except Exception as e:  # the Rust trainer reports e.g. "vocabulary is not large enough"
                raise UserError(f"tokenizer training failed: {e}") from None
        _mark_special(hf, SPECIAL_TOKENS)
        tok = cls(hf, kind)
        if vocab_size is not None and tok.vocab_size < vocab_size:
            warnings.warn(f"vocabulary has {tok.vocab_size} ids, not the {vocab_size} asked for: "
                          f"{why}; a larger corpus gives more", stacklevel=2)
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a directory written by ``save``, a Hugging Face ``tokenizer.json`` one, or GPT-2's vocab + merges."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: tokenizer directory not found")
        kind = read_json(path / META_FILE).get("kind", "hf") if (path / META_FILE).is_file() else "hf"
        if (path / "tokenizer.json").is_file():
            try:
                hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{path / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            hf, kind = _gpt2_from_files(path), "gpt2"
        else:
            raise UserError(f"{path}: no tokenizer found (no tokenizer.json, nor vocab.json + merges.txt)")
        return cls(hf, kind)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files as directory ``path`` (atomically, replacing it: not over other files)."""
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise UserError(f"{path}: exists and is not a directory")
            other = [p.name for p in path.iterdir() if p.name not in TOKENIZER_FILES]
            if other:
                raise UserError(f"{path}: directory holds other files ({other[0]}, ...); choose another --out")
        with atomic_dir(path) as tmp:
            self.write_files(tmp)

    def write_files(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer files into an existing directory (e.g. inside your own ``atomic_dir``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self._hf.to_str(pretty=True), encoding="utf-8")
        write_json(directory / META_FILE, {"format": 1, "kind": self.kind, "vocab_size": self.vocab_size,
                                           "special_ids": self.special_ids})

    def write_hf_config(self, directory: str | os.PathLike, context: int) -> dict[str, int]:
        """Write ``tokenizer_config.json`` so that ``transformers.AutoTokenizer`` gives our ids and renders our chat;
        returns the bos/eos/pad ids for ``config.json``."""
        ids = self.special_ids
        chat = set(CHAT_TOKENS) <= set(ids)
        names = {"bos": "<|endoftext|>", "eos": "<|end|>" if chat else "<|endoftext|>", "pad": "<|pad|>"}
        names = {k: v for k, v in names.items() if v in ids}
        # without a class named here a GPT-2 config makes transformers rebuild GPT-2's byte-level tokenizer from
        # tokenizer.json's vocabulary, which mangles char / word / unigram ids; decode must give back the text exactly
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **{f"{k}_token": v for k, v in names.items()},
               "model_max_length": context, "clean_up_tokenization_spaces": False}
        if self._hf.token_to_id(UNK) is not None:
            cfg["unk_token"] = UNK
        if chat:
            cfg["chat_template"] = CHAT_TEMPLATE
        write_json(Path(directory) / "tokenizer_config.json", cfg)
        return {f"{k}_token_id": ids[v] for k, v in names.items()}

    def add_special_tokens(self, names: Sequence[str] = tuple(SPECIAL_TOKENS)) -> list[str]:
        """Append the special tokens this tokenizer lacks (e.g. the chat tokens to GPT-2's); returns those added.
        New ids follow the current vocabulary, so ``model.resize_vocab(tok.vocab_size)`` keeps old ids valid."""
        missing = [n for n in names if self._hf.token_to_id(n) is None]
        if missing:
            _mark_special(self._hf, missing)
            self.__dict__ = Tokenizer(self._hf, self.kind).__dict__  # fresh encoders and caches
        return missing

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """name → id of the chat special tokens this tokenizer has (all six for a trained one; unigram: the last)."""
        return {name: i for name in SPECIAL_TOKENS if (i := self._hf.token_to_id(name)) is not None}

    def token_id(self, name: str) -> int:
        """The id of a token (usually a special token such as ``<|end|>``); UserError if it is unknown."""
        if (i := self._hf.token_to_id(name)) is None:
            raise UserError(f"tokenizer has no token {name!r} (a GPT-2 tokenizer needs add_special_tokens() "
                            f"for the chat tokens)")
        return i

    @property
    def eos_id(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def pad_id(self) -> int:  # <|pad|>, else <|endoftext|>
        return self.eos_id if (i := self._hf.token_to_id("<|pad|>")) is None else i

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's canonical JSON: equal fingerprints ⇒ identical ids for every text."""
        # key order and the last float digits (unigram scores) may change in a save/load round trip
        obj = json.loads(self._hf.to_str(), parse_float=lambda x: float(f"{float(x):.9g}"))
        return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Literal special-token strings are ordinary text unless ``allow_special``."""
        if self._tt is not None:
            return self._tt.encode(text, allowed_special="all") if allow_special else self._tt.encode_ordinary(text)
        if self._chars is not None and not allow_special:
            points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            return self._chars[np.minimum(points, len(self._chars) - 1)].tolist()
        return (self._hf if allow_special else self._plain).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (in parallel threads, or in Rust)."""
        if self._tt is not None or self._chars is not None:
            return _parallel_map(lambda t: self.encode(t, allow_special), list(texts))
        hf = self._hf if allow_special else self._plain
        batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast (no offsets) since tokenizers 0.21
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (special tokens by name unless ``skip_special``; ids past the vocabulary: U+FFFD)."""
        ids = _as_ints(ids)
        if self.kind == "hf":  # foreign tokenizer.json: its own decoder knows best
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            special = set(self.special_ids.values())
            ids = [i for i in ids if i not in special]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes of ``ids`` (a byte-level token may hold part of a character): chunks join to the whole."""
        table, n = self._byte_table, len(self._byte_table)
        return b"".join([table[i] if 0 <= i < n else "\ufffd".encode() for i in _as_ints(ids)])

    @cached_property
    def _byte_table(self) -> list[bytes]:
        added = {i: t.content.encode() for i, t in self._hf.get_added_tokens_decoder().items()}
        byte_level = isinstance(self._hf.decoder, decoders.ByteLevel)

        def piece(i: int) -> bytes:
            if byte_level:
                return bytes(_BYTE_DECODER.get(c, 0) for c in self._hf.id_to_token(i) or "")
            return self._hf.decode([i], skip_special_tokens=False).encode()

        return [added[i] if i in added else piece(i) for i in range(self.vocab_size)]


def _as_ints(ids) -> list[int]:
    """A list of ints from a list, numpy array or torch tensor of ids."""
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _parallel_map(fn, texts: list[str]) -> list:
    """``[fn(t) for t in texts]`` over a few threads in contiguous chunks (tiktoken releases the GIL while it
    encodes; one task per text would cost more than the encoding of a short text)."""
    threads = max(1, min(8, os.cpu_count() or 1))
    if threads == 1 or len(texts) < 2 * threads or sum(map(len, texts)) < 100_000:
        return [fn(t) for t in texts]
    from concurrent.futures import ThreadPoolExecutor

    step = -(-len(texts) // (4 * threads))
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    with ThreadPoolExecutor(threads) as pool:
        return [ids for part in pool.map(lambda chunk: [fn(t) for t in chunk], chunks) for ids in part]


def _tiktoken_core(hf: HFTokenizer):
    """A ``tiktoken.Encoding`` giving ``hf``'s ids, or None. Only for a GPT-2-style byte-level BPE (every byte a token,
    ids growing with merge order, all added tokens special): there tiktoken's "merge the adjacent pair whose
    concatenation has the lowest id" picks BPE's merges (tested on English, Chinese, emoji, control characters)."""
    import tiktoken

    spec = json.loads(hf.to_str())
    model, pre, added = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("added_tokens") or []
    if spec.get("normalizer") or model["type"] != "BPE" or pre.get("type") != "ByteLevel" \
            or pre.get("add_prefix_space") or not pre.get("use_regex", True) \
            or any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                          "byte_fallback")) \
            or not all(t["special"] and not any(t[k] for k in ("normalized", "lstrip", "rstrip", "single_word"))
                       for t in added):
        return None
    specials = {t["content"]: t["id"] for t in added}
    vocab: dict[str, int] = model["vocab"]
    pieces = [p for p in vocab if p not in specials]
    if any(c not in _BYTE_DECODER for p in pieces for c in p):
        return None
    ranks = {bytes(_BYTE_DECODER[c] for c in p): vocab[p] for p in pieces}
    if len(ranks) < len(pieces) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    last = -1
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last or max(vocab.get(a, i), vocab.get(b, i)) >= i:
            return None
        last = i
    return tiktoken.Encoding(name="pocketgpt-bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def _char_table(hf: HFTokenizer):
    """The id of every code point up to the largest one known (others: ``<unk>``), one past it ``<unk>``."""
    vocab = hf.get_vocab()
    chars = {ord(t): i for t, i in vocab.items() if len(t) == 1}
    table = np.full(max(chars) + 2, vocab[UNK], dtype=np.int32)
    table[list(chars)] = list(chars.values())
    return table


def _mark_special(hf: HFTokenizer, names: Sequence[str]) -> None:
    hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])


def _gpt2_from_files(directory: Path) -> HFTokenizer:
    """A byte-level BPE tokenizer from GPT-2's ``vocab.json`` + ``merges.txt`` (as GPT2TokenizerFast builds it)."""
    try:
        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    except Exception as e:  # the Rust reader names the bad line of merges.txt, or the token missing from vocab.json
        raise UserError(f"{directory}: vocab.json + merges.txt are not a GPT-2 BPE ({e})") from None
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if hf.token_to_id("<|endoftext|>") is not None:
        _mark_special(hf, ["<|endoftext|>"])
    return hf


def load_tokenizer_for(ckpt_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint: ``CKPT/tokenizer/``, else the files in ``CKPT`` (a Hugging Face directory)."""
    ckpt_dir = Path(ckpt_dir)
    return Tokenizer.load(ckpt_dir / "tokenizer" if (ckpt_dir / "tokenizer").is_dir() else ckpt_dir)
