"""Wall time of the README's laptop recipe: LoRA SFT of GPT-2 124M on the bundled chats, then LoRA DPO on the
bundled preference pairs, run as the user runs them (``pocketgpt sft`` / ``pocketgpt dpo`` in child processes).

Offline stand-in for ``--init hf:gpt2``: a random-initialised GPT-2 124M (``GPT2LMHeadModel(GPT2Config())``) saved
with GPT-2-format tokenizer files (``vocab.json`` + ``merges.txt``: a byte-level BPE trained here on the bundled
chats and pairs, its ids padded to GPT-2's 50,257 with ``<|endoftext|>`` last). The shapes, so the step times, are
the real model's; sequence lengths are close (an in-domain BPE compresses these texts about as well as GPT-2's).

    python benchmarks/lora_laptop.py                                    # a short version: per-step times
    python benchmarks/lora_laptop.py --sft-steps 300 --dpo-steps 100    # the whole recipe (README)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def make_gpt2(d: Path) -> None:
    """A random GPT-2 124M in Hugging Face's format, with GPT-2-shaped tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pocketgpt.records import read_conversations, read_pairs
    from pocketgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

    if (d / "merges.txt").exists():
        return
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(d)
    texts = [m["content"] for c in read_conversations(["chat"]) for m in c]
    texts += [p.chosen + "\n" + p.rejected for p in read_pairs(["prefs"])]
    texts += [m["content"] for p in read_pairs(["prefs"]) for m in p.prompt]
    tok = Tokenizer.train("bpe", texts, vocab_size=16384)
    model = json.loads(tok._hf.to_str())["model"]
    vocab = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    vocab += [f"<|unused{i}|>" for i in range(50256 - len(vocab))] + ["<|endoftext|>"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def timed(argv: list[str], run: Path) -> dict:
    """Run ``pocketgpt ARGV --out run``: wall time, the mean time of a training step after the first, and the peak
    memory of the largest child so far (for dpo: the larger of sft and dpo)."""
    t = time.time()
    subprocess.run([sys.executable, "-m", "pocketgpt", *argv, "--out", str(run), "--restart", "--log_interval", "1",
                    "--progress", "false"], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r and "elapsed_s" in r]
    per_step = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / max(1, len(steps) - 1)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"wall_s": round(wall, 1), "steps": len(steps), "s_per_step": round(per_step, 2), "peak_gb": round(peak, 2),
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/pocketgpt-lora-bench", help="where the stand-in model and runs go")
    ap.add_argument("--sft-steps", type=int, default=4, help="the recipe: 300")
    ap.add_argument("--dpo-steps", type=int, default=4, help="the recipe: 100")
    args = ap.parse_args()
    d = Path(args.dir)
    make_gpt2(d / "gpt2-random")
    # the README recipe, with --init the local stand-in instead of hf:gpt2
    sft = timed(["sft", "--init", str(d / "gpt2-random"), "--data", "chat", "--lora_r", "8", "--lr", "3e-4",
                 "--batch_size", "8", "--block_size", "512", "--max_steps", str(args.sft_steps)], d / "sft")
    dpo = timed(["dpo", "--init", str(d / "sft" / "ckpt"), "--data", "prefs", "--lora_r", "8", "--lr", "5e-5",
                 "--batch_size", "4", "--block_size", "512", "--max_steps", str(args.dpo_steps)], d / "dpo")
    print(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS", "all"), "load_avg": os.getloadavg()[0],
                      "sft": sft, "dpo": dpo}, indent=1))


if __name__ == "__main__":
    main()
