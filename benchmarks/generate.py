"""Decoding speed: pocketgpt's engine vs transformers' ``generate`` on the same (random) weights, in one run.

    python benchmarks/generate.py            # Shakespeare-char size (10.7M): all cases; GPT-2-124M: greedy b1, short
    python benchmarks/generate.py --full     # also every 124M case with 256 new tokens (several minutes)
    python benchmarks/generate.py --skip-124m
    python benchmarks/generate.py --utf8     # per-step cost of keeping text valid UTF-8 (byte-level BPE mask)

Cases: greedy and top-k (k=50) sampling; batch 1 and batch 8; fp32 and bf16 weights; 256 new tokens from a
one-token prompt; each case runs ``--repeats`` times alternating pocketgpt and transformers, the best of each counts. Prints tokens/s for both, the ratio, and the fraction of the DRAM bandwidth limit (every decode
step reads all weights once: limit = 31 GB/s / weight bytes steps per second; batch 8 shares one read per step).
"""

from __future__ import annotations

import os
import sys

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pocketgpt import GPT, GPTConfig  # noqa: E402
from pocketgpt.engine import generate  # noqa: E402

DRAM_BYTES_PER_S = 31e9

SIZES = {
    "shakespeare-10.7M": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2-124M": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


def load_pair(cfg_kw: dict, dtype: torch.dtype):
    """Random pocketgpt weights, exported and loaded into transformers' GPT2LMHeadModel (same numbers)."""
    import transformers
    from safetensors.torch import save_file

    from pocketgpt.hf import to_hf
    from pocketgpt.io import write_json

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**cfg_kw)).eval()
    with tempfile.TemporaryDirectory() as d:
        cfg, sd = to_hf(ours, "gpt2")
        write_json(Path(d) / "config.json", cfg)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(d) / "model.safetensors"))
        hf = transformers.GPT2LMHeadModel.from_pretrained(d, dtype=dtype).eval()
    ours = ours.to(dtype)
    return ours, hf


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def time_ours(model, batch: int, new: int, sample: bool) -> float:
    prompts = [[1]] * batch
    kw = dict(top_k=50, seed=0) if sample else dict(temperature=0)
    generate(model, prompts, max_new_tokens=8, **kw)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new, **kw)
    dt = time.perf_counter() - t0
    assert sum(len(o) for o in out) == batch * new
    return batch * new / dt


def time_hf(hf, batch: int, new: int, sample: bool) -> float:
    ids = torch.ones(batch, 1, dtype=torch.long)
    kw = dict(do_sample=True, top_k=50) if sample else dict(do_sample=False)
    gen = dict(pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids), **kw)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
        dt = time.perf_counter() - t0
    assert out.shape == (batch, 1 + new)
    return batch * new / dt


def utf8_cost(new: int, repeats: int) -> None:
    """What the engine's UTF-8 mask costs per decoding step with a 4,096-id byte-level BPE (bundled corpora): the
    mask + state update alone, and greedy decoding of the 10.7M shape with that vocabulary with and without it."""
    from pocketgpt.data import builtin_path
    from pocketgpt.engine import _TokenText, _Utf8Mask
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("bpe", [builtin_path("shakespeare"), builtin_path("shuihu")], vocab_size=4096)
    t0 = time.perf_counter()
    table = _TokenText.of(tok, tok.vocab_size, "cpu")  # the engine's cached copy
    print(f"tables for {tok.vocab_size} ids, built once per tokenizer: {(time.perf_counter() - t0) * 1e3:.0f} ms")
    for rows in (1, 8):
        mask, logits = _Utf8Mask(table, rows), torch.randn(rows, tok.vocab_size)
        tokens = torch.full((rows,), tok.encode("你")[0])
        best = 1e9
        for _ in range(repeats):
            n, t0 = 2000, time.perf_counter()
            for _ in range(n):
                mask.mask(logits)
                mask.update(tokens)
            best = min(best, (time.perf_counter() - t0) / n)
        print(f"mask + update, {rows} row(s): {best * 1e6:.1f} us per step")
    model = GPT(GPTConfig(**{**SIZES["shakespeare-10.7M"], "vocab_size": tok.vocab_size})).eval()
    blocked, best = table.blocked, {}
    for _ in range(repeats):  # alternate with / without the mask; best of each
        for on in (True, False):
            table.blocked = blocked if on else None
            generate(model, [[1]], max_new_tokens=8, temperature=0, tokenizer=tok)
            t0 = time.perf_counter()
            generate(model, [[1]], max_new_tokens=new, temperature=0, tokenizer=tok)
            best[on] = min(best.get(on, 1e9), (time.perf_counter() - t0) / new)
    table.blocked = blocked
    print(f"greedy step, batch 1, 10.7M shape with 4,096 ids: {best[True] * 1e3:.2f} ms with the mask, "
          f"{best[False] * 1e3:.2f} ms without ({(best[True] / best[False] - 1) * 100:+.1f}%)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every 124M case with 256 new tokens")
    ap.add_argument("--skip-124m", action="store_true")
    ap.add_argument("--only-124m", action="store_true")
    ap.add_argument("--new", type=int, default=256, help="new tokens (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each case, alternating; best counts (default 3)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--utf8", action="store_true", help="only the cost of the UTF-8 mask per step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.utf8:
        utf8_cost(args.new, args.repeats)
        return 0
    import transformers

    transformers.logging.set_verbosity_error()

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"DRAM limit {DRAM_BYTES_PER_S / 1e9:.0f} GB/s")
    header = f"{'model':<18} {'dtype':<5} {'mode':<6} {'batch':>5} {'new':>4} {'pocketgpt':>10} {'transformers':>12} " \
             f"{'ratio':>6} {'of BW limit':>11}"
    print(header)
    print("-" * len(header))
    for size, cfg_kw in SIZES.items():
        big = size.startswith("gpt2")
        if (big and args.skip_124m) or (not big and args.only_124m):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            ours, hf = load_pair(cfg_kw, dtype)
            limit_steps = DRAM_BYTES_PER_S / weight_bytes(ours)
            for sample in (False, True):
                for batch in (1, 8):
                    new = args.new
                    if big and not args.full:
                        if sample or batch > 1:
                            continue
                        new = min(new, 64)
                    a = b = 0.0
                    for _ in range(args.repeats):  # alternate the two; best of each (this machine is shared)
                        a = max(a, time_ours(ours, batch, new, sample))
                        b = max(b, time_hf(hf, batch, new, sample))
                    frac = (a / batch) / limit_steps
                    print(f"{size:<18} {str(dtype).split('.')[-1][:5]:<5} {'top-k' if sample else 'greedy':<6} "
                          f"{batch:>5} {new:>4} {a:>8.0f}/s {b:>10.0f}/s {a / b:>5.2f}x {frac:>10.0%}", flush=True)
            del ours, hf
    return 0


if __name__ == "__main__":
    sys.exit(main())
