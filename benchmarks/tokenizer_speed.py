"""Tokenizer throughput: pocketgpt's BPE vs Hugging Face ``tokenizers`` and raw tiktoken on the same merges.

    python benchmarks/tokenizer_speed.py [--vocab-size 4096] [--repeat 3] [--skip-cli]

pocketgpt's byte-level BPE encodes through **tiktoken's core** (its fast path: the merges as tiktoken ranks, the
GPT-2 split regex; ids tested identical to Hugging Face's). So the fair comparison is:

* pocketgpt vs Hugging Face ``tokenizers`` (the library a pocketgpt ``tokenizer.json`` is, run directly:
  ``encode`` / ``encode_batch``) on the same vocabulary: what the fast path buys;
* pocketgpt vs raw tiktoken (an ``Encoding`` built from the same merges, ``encode_ordinary`` / ``_batch``): the
  cost of pocketgpt's wrapper (special-token handling, id lists), stated as extra time over tiktoken's.

1. Trains a byte-level BPE (default 4k) on 水浒传 + Tiny Shakespeare (bundled), timing the training; checks that the
   three encoders give the same ids.
2. Encodes both texts whole and as a batch of documents with each encoder, best of ``--repeat``, in MB/s of UTF-8.
3. Times ``prepare`` of Tiny Shakespeare in-process (with the trained BPE; and char level, training its tokenizer),
   and (unless ``--skip-cli``) the whole ``pocketgpt prepare`` command in a fresh process.
Batches: both libraries may use several threads (``encode_batch``); whole texts run on one.
"""

from __future__ import annotations

import os
import sys
import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from pocketgpt import Tokenizer  # noqa: E402
from pocketgpt.data import builtin_path, prepare, read_text_file, text_documents
from pocketgpt.tokenizer import SPECIAL_TOKENS, _BYTE_DECODER

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tiktoken_encoding(tok: Tokenizer):
    """A raw tiktoken ``Encoding`` of our BPE: a token's id is its merge rank (bytes first, then merges in order)."""
    import tiktoken

    vocab = json.loads(tok._hf.to_str())["model"]["vocab"]
    ranks = {bytes(_BYTE_DECODER[c] for c in piece): i for piece, i in vocab.items() if piece not in SPECIAL_TOKENS}
    return tiktoken.Encoding(name="ours-as-tiktoken", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=tok.special_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (best of)")
    ap.add_argument("--skip-cli", action="store_true", help="skip the fresh-process CLI timing")
    args = ap.parse_args()
    os.environ.setdefault("CI", "1")  # no progress bars in timings

    en = read_text_file(builtin_path("shakespeare"))
    zh = read_text_file(builtin_path("shuihu"))
    texts = {"shakespeare": en, "shuihu": zh}
    docs = {k: text_documents(v) for k, v in texts.items()}
    print(f"corpus: Tiny Shakespeare {len(en.encode()) / 1e6:.2f} MB, 水浒传 {len(zh.encode()) / 1e6:.2f} MB "
          f"(UTF-8); threads: {os.cpu_count()} CPUs")

    t0 = time.perf_counter()
    tok = Tokenizer.train("bpe", [en, zh], args.vocab_size)
    print(f"train {args.vocab_size} BPE: {time.perf_counter() - t0:.2f} s")

    hf = tok._hf  # Hugging Face tokenizers itself: the tokenizer.json pocketgpt saves
    enc = tiktoken_encoding(tok)
    print(f"pocketgpt's encoder: {'tiktoken core (byte-level BPE fast path)' if tok._tt is not None else 'HF'}")
    for name, text in texts.items():
        sample = text[:200_000]
        same = tok.encode(sample) == hf.encode(sample, add_special_tokens=False).ids == enc.encode_ordinary(sample)
        print(f"  ids identical (pocketgpt = HF tokenizers = tiktoken) on {name} (200k chars): {same}")

    print(f"\n{'text':12s} {'mode':22s} {'pocketgpt':>10s} {'HF tok.':>8s} {'tiktoken':>9s}  (MB/s)"
          f" {'pocketgpt/HF':>13s} {'wrapper cost':>13s}")
    for name, text in texts.items():
        mb = len(text.encode()) / 1e6
        d = docs[name]
        rows = [
            ("whole text", lambda: tok.encode(text), lambda: hf.encode(text, add_special_tokens=False),
             lambda: enc.encode_ordinary(text)),
            (f"batch of {len(d)} docs", lambda: tok.encode_batch(d),
             lambda: hf.encode_batch(d, add_special_tokens=False), lambda: enc.encode_ordinary_batch(d)),
        ]
        for mode, ours_fn, hf_fn, tt_fn in rows:
            ours, slow, raw = (best_of(f, args.repeat) for f in (ours_fn, hf_fn, tt_fn))
            print(f"{name:12s} {mode:22s} {mb / ours:10.2f} {mb / slow:8.2f} {mb / raw:9.2f}        "
                  f"{slow / ours:12.2f}x {100 * (ours / raw - 1):+12.0f}%")
    print("pocketgpt/HF: how much faster than Hugging Face tokenizers on the same merges (tiktoken's core); "
          "wrapper cost: pocketgpt's extra time over raw tiktoken")

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tok"
        tok.save(tok_dir)
        prep = lambda out: prepare([], Path(tmp) / out, tok_dir, builtins=["shakespeare"], verbose=False)  # noqa
        t0 = time.perf_counter()
        meta = prep("bpe")
        t_bpe = time.perf_counter() - t0
        t0 = time.perf_counter()
        prep("bpe")
        t_noop = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare([], Path(tmp) / "char", None, builtins=["shakespeare"], kind="char", verbose=False)
        t_char = time.perf_counter() - t0
        print(f"\nprepare Tiny Shakespeare in-process: {args.vocab_size} BPE {t_bpe:.2f} s "
              f"({meta['counts']['train'] + meta['counts']['val']:,} tokens), re-run no-op {t_noop:.2f} s, "
              f"char (training its tokenizer) {t_char:.2f} s")
        if not args.skip_cli:
            cmd = [sys.executable, "-m", "pocketgpt", "prepare", "--builtin", "shakespeare", "--tokenizer",
                   str(tok_dir), "--out", str(Path(tmp) / "cli")]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            t_cli = time.perf_counter() - t0
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import pocketgpt.cli"], check=True)
            t_imp = time.perf_counter() - t0
            print(f"pocketgpt prepare --builtin shakespeare --tokenizer BPE (fresh process): {t_cli:.2f} s, of which "
                  f"Python + package import ~{t_imp:.2f} s")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            t_torch = time.perf_counter() - t0
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(f"  (a bare 'import torch' takes {t_torch:.2f} s here; load average {load:.1f} on "
                  f"{os.cpu_count()} CPUs)")
        work = max(t_bpe, t_char)
        print(f"prepare: {work:.2f} s in-process" + ("" if args.skip_cli else f", {t_cli:.2f} s as a fresh command"))


if __name__ == "__main__":
    main()
