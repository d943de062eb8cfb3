"""Tokenizer throughput vs tiktoken, and ``prepare`` end to end.

    .venv/bin/python benchmarks/tokenize.py [--vocab-size 4096] [--repeat 3] [--skip-cli]

1. Trains a byte-level BPE (default 4k) on 水浒传 + Tiny Shakespeare (bundled), timing the training.
2. Encodes both texts with ours (``encode`` on whole texts, and ``encode_batch`` on their documents) and with
   tiktoken in the same run, reporting MB/s (UTF-8 bytes) and the ratio. tiktoken's own ``gpt2`` encoding needs
   its BPE file from the internet; when that is not available (it is not here) the script builds a tiktoken
   ``Encoding`` from OUR trained BPE (same merges as ranks, same GPT-2 split regex), so both encoders run on the
   same vocabulary, and it checks that both produce the same ids.
3. Times ``prepare`` of Tiny Shakespeare in-process (with the trained BPE; and char level, training its tokenizer),
   and (unless ``--skip-cli``) the whole ``pocketgpt prepare --builtin shakespeare --tokenizer BPE`` command in a
   fresh process (Python + torch import included).
Goal: encode within 2x of tiktoken; prepare under 5 s.
"""

from __future__ import annotations

import os
import sys

# this file is named like the standard library's `tokenize`: keep its folder off the import path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

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
    """(encoding, description): tiktoken's gpt2 if it can be had, else one built from our BPE's merges."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2"), "tiktoken gpt2 (50k vocab, its own file)"
    except Exception as e:  # no network here
        reason = type(e).__name__
    # our vocabulary as tiktoken ranks: a token's id is its merge rank (bytes first, then merges in order)
    vocab = json.loads(tok._hf.to_str())["model"]["vocab"]
    ranks = {bytes(_BYTE_DECODER[c] for c in piece): i for piece, i in vocab.items() if piece not in SPECIAL_TOKENS}
    enc = tiktoken.Encoding(name="ours-as-tiktoken", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=tok.special_ids)
    return enc, f"tiktoken built from our {tok.vocab_size}-token BPE (gpt2 file unavailable: {reason})"


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

    os.environ["POCKETGPT_TOKENIZER_BACKEND"] = "hf"
    hf_only = Tokenizer(tok._hf, "bpe")  # the same tokenizer without the tiktoken core: Hugging Face only
    del os.environ["POCKETGPT_TOKENIZER_BACKEND"]
    print(f"our encoder: {'tiktoken core (byte-level BPE fast path)' if tok._tt is not None else 'Hugging Face'}")
    enc, desc = tiktoken_encoding(tok)
    print(f"reference: {desc}")
    if enc.name == "ours-as-tiktoken":
        for name, text in texts.items():
            sample = text[:200_000]
            same = hf_only.encode(sample) == enc.encode_ordinary(sample)
            print(f"  ids identical to ours on {name} (200k chars): {same}")

    print(f"\n{'text':12s} {'mode':24s} {'ours MB/s':>10s} {'HF-only MB/s':>13s} {'tiktoken MB/s':>14s} "
          f"{'ours/tiktoken':>14s} {'HF-only/tiktoken':>17s}")
    ratios, hf_ratios = [], []
    for name, text in texts.items():
        mb = len(text.encode()) / 1e6
        d = docs[name]
        rows = [
            ("whole text", lambda t: t.encode(text), lambda: enc.encode_ordinary(text)),
            (f"batch of {len(d)} docs", lambda t: t.encode_batch(d), lambda: enc.encode_ordinary_batch(d)),
        ]
        for mode, ours_fn, ref_fn in rows:
            ours = mb / best_of(lambda: ours_fn(tok), args.repeat)
            slow = mb / best_of(lambda: ours_fn(hf_only), args.repeat)
            ref = mb / best_of(ref_fn, args.repeat)
            ratios.append(ours / ref)
            hf_ratios.append(slow / ref)
            print(f"{name:12s} {mode:24s} {ours:10.2f} {slow:13.2f} {ref:14.2f} {ours / ref:14.2f} {slow / ref:17.2f}")
    print(f"worst ours/tiktoken ratio: {min(ratios):.2f} (goal >= 0.5); Hugging Face backend alone: "
          f"{min(hf_ratios):.2f}")

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
        print(f"goal prepare < 5 s: {'met' if work < 5 else 'NOT met'} in-process ({work:.2f} s)"
              + ("" if args.skip_cli else f"; fresh process {'met' if t_cli < 5 else 'NOT met'} ({t_cli:.2f} s)"))


if __name__ == "__main__":
    main()
