"""The same checkpoint and prompt in each runtime: pocketgpt's engine, transformers on the HF export, llama.cpp on the
GGUF export (``llama-cpp-python``, or llama.cpp's ``llama-completion`` / older ``llama-cli`` on PATH, when installed),
greedy, measured in the same run.

    python benchmarks/runtimes.py --ckpt RUN/ckpt [--prompt TEXT] [--new 128] [--threads 2] [--gguf-dtype f32 q8_0]
    python benchmarks/runtimes.py        # no --ckpt: random weights of issue 17's shape (12.2M, 6L/384d Llama-style,
                                         # byte-level BPE of 4,096 ids trained on the bundled corpora)

Prints each runtime's text and tokens/s (prefill + ``--new`` decode steps, batch 1, best of ``--repeats``, the
runtimes alternating). Every runtime gets the same ids (``<|endoftext|>`` + the prompt's) and generates exactly
``--new`` tokens (no stop token), so the texts agree where the numbers do (q8_0 may drift after a while).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from pocketgpt.checkpoint import export_hf, load_model  # noqa: E402
from pocketgpt.engine import generate  # noqa: E402
from pocketgpt.gguf_export import export_gguf  # noqa: E402
from pocketgpt.tokenizer import load_tokenizer_for  # noqa: E402


def best(fn, repeats: int):
    """(output of the last run, shortest wall time) of ``fn()``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def runners(args, ids, tok, work: Path):
    model = load_model(args.ckpt)
    yield "pocketgpt engine", lambda: generate(model, [ids], temperature=0, max_new_tokens=args.new)[0]

    import transformers

    export_hf(model, work / "hf")
    transformers.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def hf_generate():
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                              pad_token_id=tok.pad_id)
        return out[0, len(ids):].tolist()

    yield "transformers (HF export)", hf_generate

    binary = next((b for b in ("llama-completion", "llama-cli") if shutil.which(b)), None)
    for dtype in args.gguf_dtype:
        path = work / f"m-{dtype}.gguf"
        export_gguf(args.ckpt, path, dtype)
        try:
            import llama_cpp
        except ImportError:
            llama_cpp = None
        if llama_cpp is not None:
            llm = llama_cpp.Llama(str(path), n_ctx=model.config.block_size, n_threads=args.threads, verbose=False)
            ban = {i: -1e9 for i in tok.special_ids.values()}  # it stops at EOS: keep every run --new long

            def run(llm=llm, ban=ban):
                out = llm.create_completion(ids, max_tokens=args.new, temperature=0.0, logit_bias=ban)
                return out["choices"][0]["text"]

            yield f"llama.cpp {dtype} (llama-cpp-python)", run
        elif binary:
            yield f"llama.cpp {dtype} ({binary})", lambda path=path: llama_cli(binary, path, args, tok.decode(ids[1:]))
        else:
            yield f"llama.cpp {dtype}", None


def llama_cli(binary: str, path: Path, args, prompt: str):
    """(text, seconds of prompt eval + eval) from llama.cpp's own timing lines (loading the model excluded)."""
    p = subprocess.run([binary, "-m", str(path), "-p", prompt, "-n", str(args.new), "--temp", "0", "--ignore-eos",
                        "-t", str(args.threads), "-no-cnv", "--no-display-prompt", "--simple-io"],
                       capture_output=True, timeout=600)
    err = p.stderr.decode(errors="replace")
    ms = [float(m) for m in re.findall(r"(?:prompt eval|\beval) time =\s*([\d.]+) ms", err)]
    if p.returncode or len(ms) != 2:
        raise SystemExit(f"{binary} failed ({p.returncode}): {err[-2000:]}")
    # llama-completion ends its output with two newlines of its own
    return p.stdout.decode("utf-8", errors="replace").removesuffix("\n\n"), sum(ms) / 1000


def random_checkpoint(work: Path) -> Path:
    from pocketgpt.checkpoint import save_model
    from pocketgpt.data import builtin_path
    from pocketgpt.model import GPT, GPTConfig
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("bpe", [builtin_path("shakespeare"), builtin_path("shuihu")], 4096)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384, pos="rope",
                          norm="rmsnorm", mlp="swiglu"))
    save_model(model, work / "ckpt")
    tok.save(work / "ckpt" / "tokenizer")
    return work / "ckpt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint (default: random weights of a 12.2M Llama-style model)")
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf-dtype", nargs="+", default=["f32", "q8_0"], choices=["f32", "f16", "q8_0"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        args.ckpt = args.ckpt or random_checkpoint(Path(work))
        tok = load_tokenizer_for(args.ckpt)
        ids = [tok.eos_id] + tok.encode(args.prompt)
        print(f"{args.ckpt}: prompt {args.prompt!r} ({len(ids)} ids), {args.new} new tokens, greedy, batch 1, "
              f"{args.threads} threads, best of {args.repeats}\n")
        for name, fn in list(runners(args, ids, tok, Path(work))):
            if fn is None:
                print(f"== {name}: not installed (pip install llama-cpp-python, or llama-completion on PATH)\n")
                continue
            fn()  # warm-up
            out, seconds = best(fn, args.repeats)
            if isinstance(out, tuple):  # llama-cli reports its own timings
                out, seconds = out
            text = out if isinstance(out, str) else tok.decode(out)
            rows.append((name, args.new / seconds, text))
            print(f"== {name}: {args.new / seconds:.1f} tok/s\n{text!r}\n")
    base, ref = rows[0][1], rows[0][2]
    print("| runtime | tok/s | vs pocketgpt | same text as pocketgpt |\n| --- | --- | --- | --- |")
    for name, speed, text in rows:
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {'yes' if text == ref else 'no'} |")


if __name__ == "__main__":
    main()
