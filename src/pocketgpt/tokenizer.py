"""Tokenizers: train, load, save, encode, decode — one class over Hugging Face ``tokenizers``.

Four kinds can be trained (``Tokenizer.train(kind, ...)``):

* ``bpe``     byte-level BPE exactly as GPT-2 (lossless for any UTF-8 text, Chinese and emoji included);
* ``unigram`` SentencePiece-style unigram model (spaces become ``▁``), good for Chinese;
* ``char``    one id per character seen in training, plus ``<unk>`` for unseen ones;
* ``word``    words, single punctuation marks and whitespace runs (a word keeps its leading space, each Chinese
  character is a word), plus ``<unk>``; meant for tiny teaching corpora.

Every trained tokenizer reserves the chat special tokens ``SPECIAL_TOKENS`` (ids 0..5; the last six ids for
``unigram``: use ``special_ids`` / ``token_id``, never literal numbers). They are single ids and are
never produced from plain text: ``encode("<|user|>")`` encodes the literal characters; only
``encode(text, allow_special=True)`` turns the literal strings into the special ids.

GPT-2's own files (``vocab.json`` + ``merges.txt``, or a ``tokenizer.json``) load from a local directory with ids
identical to ``transformers.GPT2TokenizerFast``; such a tokenizer only knows ``<|endoftext|>``, and
``add_special_tokens()`` appends the chat tokens (then grow the model with ``model.resize_vocab(tok.vocab_size)``).

A saved tokenizer is a directory: ``tokenizer.json`` (the Hugging Face file, loadable by ``transformers``) and
``pocketgpt_tokenizer.json`` (kind and special ids).

Streaming: ``decode_bytes(ids)`` returns the raw UTF-8 bytes of the tokens (a byte-level token may hold half of a
Chinese character), so a streamer can emit only complete characters; ``decode`` = ``decode_bytes`` then UTF-8 with
replacement of incomplete sequences.

Speed: Hugging Face ``tokenizers`` trains every kind and defines the ids. Encoding a GPT-2-style byte-level BPE goes
through tiktoken's core (identical ids: tested against the HF model and ``GPT2TokenizerFast``), a char tokenizer
through a numpy lookup (``benchmarks/tokenizer_speed.py``); ``POCKETGPT_TOKENIZER_BACKEND=hf`` turns both off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError
from .io import atomic_dir, read_json, write_json

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK = "<unk>"
KINDS = ("bpe", "unigram", "char", "word")
META_FILE = "pocketgpt_tokenizer.json"
TOKENIZER_FILES = {"tokenizer.json", META_FILE, "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json"}

# The Jinja twin of ``chat.render`` for exported tokenizers (the tests compare both on every tokenizer kind)
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role'] + ' (expected system, user or assistant)') }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# GPT-2's pre-tokenizer split (what HF's ByteLevel(use_regex=True) applies)
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# words (a leading space attached), each Chinese character alone, single punctuation marks, whitespace runs
_WORD_PATTERN = r"\p{Han}| ?[[\w']&&[^\p{Han}]]+| ?[^\w\s]|\s+(?!\S)|\s+"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (used by byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _read_texts(files_or_texts: Iterable[str | os.PathLike], encoding: str = "utf-8", errors: str = "strict"):
    """Yield the texts to train on: ``Path`` objects (and strings naming existing files) are read, other strings
    are used as they are. ``.gz`` files are decompressed."""
    for item in files_or_texts:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and len(item) < 4096
                                             and os.path.isfile(item)):
            from .records import read_text_file

            yield read_text_file(Path(item), encoding=encoding, errors=errors)
        elif isinstance(item, str):
            yield item
        else:
            raise UserError(f"tokenizer training input must be a path or a string, got {type(item).__name__}")


class Tokenizer:
    """A trained or loaded tokenizer. Build with ``Tokenizer.train`` / ``Tokenizer.load``."""

    def __init__(self, hf, kind: str = "hf"):
        from tokenizers import Tokenizer as HFTokenizer

        self.kind = kind
        self._hf = hf  # encodes the special strings as special ids
        self._hf.encode_special_tokens = False
        self._plain = HFTokenizer.from_str(hf.to_str())  # encodes them as ordinary text
        self._plain.encode_special_tokens = True
        self._byte_table: list[bytes] | None = None
        self._fingerprint: str | None = None
        fast = os.environ.get("POCKETGPT_TOKENIZER_BACKEND", "auto") != "hf"
        self._tt = _tiktoken_core(hf) if fast else None  # byte-level BPE through tiktoken's core
        self._chars = _char_table(hf) if fast and kind == "char" else None  # char level through numpy

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, kind: str, files_or_texts: Iterable[str | os.PathLike], vocab_size: int | None = None, *,
              min_frequency: int = 0, encoding: str = "utf-8", errors: str = "strict",
              show_progress: bool = False) -> "Tokenizer":
        """Train a tokenizer of ``kind`` (bpe, unigram, char, word) on files (``Path`` or existing path strings)
        and/or literal texts. ``vocab_size`` counts everything (special tokens and ``<unk>`` included); for ``char``
        it may be None (= every character seen)."""
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        if kind not in KINDS:
            raise UserError(f"--kind: unknown tokenizer kind {kind!r} (choose from {', '.join(KINDS)})")
        texts = [t for t in _read_texts(files_or_texts, encoding, errors) if t]
        if not any(t.strip() for t in texts):
            raise UserError("tokenizer training: the corpus is empty")
        if vocab_size is None and kind != "char":
            raise UserError(f"--vocab-size: required for a {kind} tokenizer")
        n_special = len(SPECIAL_TOKENS)

        if kind == "bpe":
            if vocab_size < 256 + n_special:
                raise UserError(f"--vocab-size: {vocab_size} is below the 256 byte symbols + {n_special} special "
                                f"tokens a byte-level BPE needs (minimum {256 + n_special})")
            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                          special_tokens=SPECIAL_TOKENS,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=show_progress)
        elif kind == "unigram":
            alphabet = set().union(*(set(t) for t in texts)) - {" "}
            need = len(alphabet) + n_special + 2  # + <unk> + ▁
            if vocab_size < need:
                raise UserError(f"--vocab-size: {vocab_size} is below the {len(alphabet)} distinct characters + "
                                f"{n_special + 1} special tokens of this corpus (minimum {need})")
            hf = HFTokenizer(models.Unigram())
            hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
            hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
            # the special tokens stay out of the unigram model (it would segment their literal strings as pieces):
            # they are added after training, so they take the last ids
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size - n_special, special_tokens=[UNK],
                                              unk_token=UNK, show_progress=show_progress)
        elif kind == "char":  # no statistics needed: every character seen, in code point order
            alphabet = sorted(set().union(*(set(t) for t in texts)))
            need = len(alphabet) + n_special + 1
            if vocab_size is not None and vocab_size < need:
                raise UserError(f"--vocab-size: {vocab_size} is below the {len(alphabet)} distinct characters + "
                                f"{n_special + 1} special tokens of this corpus (minimum {need}; or omit it)")
            vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [UNK] + alphabet)}
            hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            hf.decoder = decoders.Fuse()
            _mark_special(hf, SPECIAL_TOKENS)
            return _warn_if_small(cls(hf, kind), vocab_size)
        else:  # word: a word-level model over words, punctuation marks and whitespace runs
            need = n_special + 2
            if vocab_size < need:
                raise UserError(f"--vocab-size: {vocab_size} is below the {n_special + 1} special tokens "
                                f"(minimum {need})")
            hf = HFTokenizer(models.WordLevel(unk_token=UNK))
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")
            hf.decoder = decoders.Fuse()
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                special_tokens=SPECIAL_TOKENS + [UNK], show_progress=show_progress)
        try:
            hf.train_from_iterator(texts, trainer)
        except Exception as e:  # the Rust trainer reports e.g. "vocabulary is not large enough"
            raise UserError(f"tokenizer training failed: {e}") from None
        _mark_special(hf, SPECIAL_TOKENS)
        return _warn_if_small(cls(hf, kind), vocab_size)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a directory written by ``save``, a Hugging Face ``tokenizer.json`` (file or directory), or GPT-2's
        ``vocab.json`` + ``merges.txt``."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_file() and path.name == "tokenizer.json":
            path = path.parent
        if not path.is_dir():
            raise UserError(f"{path}: tokenizer directory not found")
        kind = "hf"
        if (path / META_FILE).is_file():
            kind = read_json(path / META_FILE).get("kind", "hf")
        if (path / "tokenizer.json").is_file():
            try:
                hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{path / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            hf = _gpt2_from_files(path / "vocab.json", path / "merges.txt")
            kind = "gpt2"
        else:
            raise UserError(f"{path}: no tokenizer.json or vocab.json + merges.txt in this directory")
        return cls(hf, kind)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` + ``pocketgpt_tokenizer.json`` into directory ``path`` (atomically; it replaces
        ``path``, so a directory holding anything but tokenizer files is refused)."""
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
        meta = {"format": 1, "kind": self.kind, "vocab_size": self.vocab_size, "special_ids": self.special_ids}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def write_hf_config(self, directory: str | os.PathLike, context: int) -> dict[str, int]:
        """Write ``tokenizer_config.json`` (special tokens, the chat template) beside ``tokenizer.json`` so that
        ``transformers.AutoTokenizer`` gives our ids and renders our chat; returns the bos/eos/pad ids for
        ``config.json``."""
        ids = self.special_ids
        chat = all(n in ids for n in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
        names = {"bos": "<|endoftext|>", "eos": "<|end|>" if chat else "<|endoftext|>", "pad": "<|pad|>"}
        names = {k: v for k, v in names.items() if v in ids}
        cfg = {
            # without a class named here a GPT-2 config makes transformers rebuild GPT-2's byte-level tokenizer
            # from tokenizer.json's vocabulary, which mangles char / word / unigram ids (spaces and newlines vanish)
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{k}_token": v for k, v in names.items()},
            "model_max_length": context,
            "clean_up_tokenization_spaces": False,  # decode must give back the text exactly
        }
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
            self.__init__(self._hf, self.kind)
        return missing

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """name → id for the chat special tokens this tokenizer has (all six for a trained one)."""
        out = {}
        for name in SPECIAL_TOKENS:
            i = self._hf.token_to_id(name)
            if i is not None:
                out[name] = i
        return out

    def token_id(self, name: str) -> int:
        """The id of a token (usually a special token such as ``<|end|>``); UserError if it is unknown."""
        i = self._hf.token_to_id(name)
        if i is None:
            raise UserError(f"tokenizer has no token {name!r} (a GPT-2 tokenizer needs add_special_tokens() "
                            f"for the chat tokens)")
        return i

    @property
    def eos_id(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def pad_id(self) -> int:
        """``<|pad|>`` if present, else ``<|endoftext|>``."""
        i = self._hf.token_to_id("<|pad|>")
        return self.eos_id if i is None else i

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's canonical JSON: equal fingerprints ⇒ identical ids for every text."""
        if self._fingerprint is None:
            # key order and the last float digits (unigram scores) may change in a save/load round trip
            obj = json.loads(self._hf.to_str(), parse_float=lambda x: float(f"{float(x):.9g}"))
            canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Literal special-token strings are ordinary text unless ``allow_special``."""
        if self._tt is not None:
            return self._tt.encode(text, allowed_special="all") if allow_special else self._tt.encode_ordinary(text)
        if self._chars is not None:
            return self._encode_chars(text, allow_special)
        hf = self._hf if allow_special else self._plain
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in Rust)."""
        if self._tt is not None:
            return _parallel_map(lambda t: self.encode(t, allow_special), list(texts))
        if self._chars is not None:
            return [self._encode_chars(t, allow_special) for t in texts]
        hf = self._hf if allow_special else self._plain
        batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast (no offsets) since tokenizers 0.21
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def _encode_chars(self, text: str, allow_special: bool) -> list[int]:
        import numpy as np

        keys, values, unk, special = self._chars
        if allow_special and special.search(text):
            out, pos = [], 0
            for m in special.finditer(text):
                out += self._encode_chars(text[pos:m.start()], False) + [self._hf.token_to_id(m.group())]
                pos = m.end()
            return out + self._encode_chars(text[pos:], False)
        try:
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # lone surrogates: let Hugging Face handle them
            return self._plain.encode(text, add_special_tokens=False).ids
        idx = np.minimum(np.searchsorted(keys, points), len(keys) - 1)
        return np.where(keys[idx] == points, values[idx], unk).tolist()

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are rendered as their names unless ``skip_special``. Ids outside the
        vocabulary (a model vocabulary padded beyond the tokenizer's) decode to U+FFFD."""
        ids = _as_ints(ids)
        if self.kind == "hf":  # foreign tokenizer.json: its own decoder knows best
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            special = set(self.special_ids.values())
            ids = [i for i in ids if i not in special]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes of ``ids`` token by token: concatenating the bytes of consecutive chunks equals the bytes of
        the whole, so a streamer can buffer and emit only complete characters."""
        table = self._bytes_table()
        ids = _as_ints(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(table)):  # e.g. a model vocab padded beyond the tokenizer's
            return b"".join([table[i] if 0 <= i < len(table) else "\ufffd".encode() for i in ids])
        return b"".join([table[i] for i in ids])

    def _bytes_table(self) -> list[bytes]:
        if self._byte_table is None:
            n = self.vocab_size
            byte_level = "ByteLevel" in type(self._hf.decoder).__name__ if self._hf.decoder else False
            added = {i: t.content for i, t in self._hf.get_added_tokens_decoder().items()}
            table = []
            for i in range(n):
                if i in added:
                    table.append(added[i].encode("utf-8"))
                    continue
                piece = self._hf.id_to_token(i) or ""
                if byte_level:
                    table.append(bytes(_BYTE_DECODER.get(c, 0) for c in piece))
                else:
                    table.append(self._hf.decode([i], skip_special_tokens=False).encode("utf-8"))
            self._byte_table = table
        return self._byte_table


_SMALL_REASON = {
    "bpe": "no pair of adjacent tokens is left to merge (every word of the corpus is one token already)",
    "unigram": "the corpus has no more pieces worth keeping",
    "char": "that is every distinct character of the corpus plus the special tokens",
    "word": "that is every distinct word of the corpus (at --min-frequency) plus the special tokens",
}


def _warn_if_small(tok: "Tokenizer", asked: int | None) -> "Tokenizer":
    """A corpus too small for the asked vocabulary gives fewer ids: say so, with the reason, instead of silently."""
    if asked is not None and tok.vocab_size < asked:
        import warnings

        warnings.warn(f"vocabulary has {tok.vocab_size} ids, not the {asked} asked for: {_SMALL_REASON[tok.kind]}; "
                      "a larger corpus gives more", stacklevel=3)
    return tok


def _as_ints(ids) -> list[int]:
    """A list of ints from a list, numpy array or torch tensor of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


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
        parts = list(pool.map(lambda chunk: [fn(t) for t in chunk], chunks))
    return [ids for part in parts for ids in part]


def _tiktoken_core(hf):
    """A ``tiktoken.Encoding`` giving the same ids as ``hf``, faster, or None.

    Only for a GPT-2-style byte-level BPE (no normaliser, ByteLevel pre-tokenizer with GPT-2's split regex, every
    byte a token, token ids growing with merge order, all added tokens special): there tiktoken's rule "merge the
    adjacent pair whose concatenation has the lowest id" picks the same merges as BPE's merge list (checked by the
    tests on English, Chinese, emoji and control characters). Set ``POCKETGPT_TOKENIZER_BACKEND=hf`` to turn it off.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout") is not None \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback") or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") \
            or not pre.get("use_regex", True):
        return None
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    if not all(t.get("special") and not t.get("normalized") and not t.get("lstrip") and not t.get("rstrip")
               and not t.get("single_word") for t in spec.get("added_tokens") or []):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    ranks: dict[bytes, int] = {}
    for piece, i in vocab.items():
        if piece in added:
            continue
        if any(c not in _BYTE_DECODER for c in piece):
            return None
        b = bytes(_BYTE_DECODER[c] for c in piece)
        if b in ranks:
            return None
        ranks[b] = i
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    last = -1
    for m in model.get("merges") or []:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last or max(vocab.get(a, i), vocab.get(b, i)) >= i:
            return None
        last = i
    return tiktoken.Encoding(name="pocketgpt-bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=added)


def _char_table(hf):
    """(sorted code points, their ids, unk id, special-token regex) for a character-level WordLevel model."""
    import re

    import numpy as np

    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "WordLevel" or spec.get("normalizer") is not None:
        return None
    added = {t["content"] for t in spec.get("added_tokens") or []}
    chars = {t: i for t, i in model["vocab"].items() if t not in added and t != model.get("unk_token")}
    if not all(len(t) == 1 for t in chars) or model.get("unk_token") not in model["vocab"]:
        return None
    order = sorted(chars, key=ord)
    keys = np.array([ord(c) for c in order], dtype=np.uint32)
    values = np.array([chars[c] for c in order], dtype=np.int64)
    special = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) or "(?!)")
    return keys, values, model["vocab"][model["unk_token"]], special


def _mark_special(hf, names: Sequence[str]) -> None:
    from tokenizers import AddedToken

    hf.add_special_tokens([AddedToken(n, special=True, normalized=False, single_word=False, lstrip=False,
                                      rstrip=False) for n in names])


def _gpt2_from_files(vocab_path: Path, merges_path: Path):
    """A byte-level BPE tokenizer from GPT-2's ``vocab.json`` + ``merges.txt`` (as GPT2TokenizerFast builds it)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise UserError(f"{vocab_path}: expected a JSON object token → id")
    merges = []
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{merges_path}: not UTF-8 text (byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{merges_path}:{lineno}: expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                                    fuse_unk=False))
    except Exception as e:
        raise UserError(f"{merges_path}: merges do not match {vocab_path.name} ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if "<|endoftext|>" in vocab:
        _mark_special(hf, ["<|endoftext|>"])
    return hf


def load_tokenizer_for(ckpt_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint: ``CKPT/tokenizer/``, else tokenizer files directly in ``CKPT`` (a Hugging Face
    model directory)."""
    ckpt_dir = Path(ckpt_dir)
    for d in (ckpt_dir / "tokenizer", ckpt_dir):
        if (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
            return Tokenizer.load(d)
    raise UserError(f"{ckpt_dir}: no tokenizer found (expected {ckpt_dir / 'tokenizer'}/ or tokenizer.json / "
                    f"vocab.json + merges.txt)")
