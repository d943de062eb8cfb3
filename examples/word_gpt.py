"""A word-level GPT on a tiny sentence corpus, then greedy generation: the first system of the seed tutorials.

    python examples/word_gpt.py              # ~400 steps, a few seconds on a laptop CPU
    python examples/word_gpt.py --quick      # fewer steps (what the tests run)
    python examples/word_gpt.py --prompt "the dog" --prompt "a horse"

Pipeline (every step is a library call):
  1. ``Tokenizer.train("word", ...)``: one id per word of ``examples/sentences.txt`` (+ the special tokens)
  2. ``pocketgpt.data.prepare``: one document per sentence, each starting with ``<|endoftext|>``
  3. a 2-layer ``GPT`` trained by the library's ``Trainer`` with the pretraining stage (random windows)
  4. ``pocketgpt.generate(..., temperature=0)``: greedy continuations of a few prompts, stopped at
     ``<|endoftext|>``; each is checked against the corpus (a memorising model reproduces its sentences).

Outputs in ``--out`` (default ``runs/examples/word_gpt``): ``data/`` (shards + tokenizer), ``run/`` (the Trainer's
run directory: ``ckpt/``, ``metrics.jsonl``, ``loss.png``) and ``results.json`` (prompts, continuations, matches).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "sentences.txt"
DEFAULT_PROMPTS = ["the cat", "the dog", "a bird", "my mother", "the ship"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a word-level GPT on a tiny sentence corpus and generate greedily.")
    p.add_argument("--out", default="runs/examples/word_gpt", help="output directory (default runs/examples/word_gpt)")
    p.add_argument("--corpus", default=str(CORPUS), help="text file, one sentence per line (default: sentences.txt)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400; 150 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run for tests/CI (150 steps)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help=f"a prompt to continue (may repeat; default: {', '.join(DEFAULT_PROMPTS)})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 150 if args.quick else 400
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pocketgpt import GPT, GPTConfig, Tokenizer, generate
    from pocketgpt.checkpoint import load_model
    from pocketgpt.data import TokenShards, prepare, read_text_file
    from pocketgpt.errors import UserError
    from pocketgpt.io import write_json
    from pocketgpt.train.pretrain import PretrainStage
    from pocketgpt.train.trainer import TrainConfig, Trainer

    if args.steps <= 0:
        raise UserError(f"--steps: must be a positive integer, got {args.steps}")
    out = Path(args.out)
    corpus = Path(args.corpus)
    sentences = [line.strip() for line in read_text_file(corpus).splitlines() if line.strip()]
    print(f"corpus: {len(sentences)} sentences from {corpus}")

    # 1. a word tokenizer: every distinct word (with its leading space) gets an id
    tok = Tokenizer.train("word", [corpus], vocab_size=1000)
    print(f"word tokenizer: {tok.vocab_size} ids (6 special + <unk> + words); "
          f"'{sentences[0]}' -> {tok.encode(sentences[0])}")

    # 2. shards: every sentence is a document; all of them go to training (we want the model to memorise them)
    meta = prepare([corpus], out / "data", tok, val_fraction=0.0, force=True, verbose=False)
    print(f"prepared {meta['counts']['train']} training tokens in {out / 'data'}")

    # 3. a tiny GPT trained by the library's Trainer with the pretraining stage
    block_size = 32
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=64,
                       dropout=0.0, bias=False)
    torch.manual_seed(args.seed)
    model = GPT(config)
    train = TokenShards(out / "data", "train", block_size)
    tcfg = TrainConfig(max_steps=args.steps, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                       weight_decay=0.0, dtype="fp32", device=args.device, eval_interval=0, ckpt_interval=0,
                       log_interval=10, seed=args.seed)
    stage = PretrainStage(train, None, tcfg.batch_size, seed=args.seed)
    print(f"training a {model.num_params() / 1e3:.0f}K-parameter GPT for {args.steps} steps ...")
    t0 = time.time()
    result = Trainer(model, stage, tcfg, out / "run", tokenizer=tok, resume=False,
                     run_config={"model": config.to_dict()}).fit()
    print(f"done in {time.time() - t0:.1f}s: final train loss {result['train_loss']:.3f}; "
          f"model in {out / 'run' / 'ckpt'}, curve in {out / 'run' / 'loss.png'}")

    # 4. greedy generation from the saved checkpoint
    model = load_model(out / "run" / "ckpt").eval()
    tok = Tokenizer.load(out / "run" / "ckpt" / "tokenizer")
    eos = tok.eos_id
    prompts = args.prompt or DEFAULT_PROMPTS
    outputs = generate(model, [[eos] + tok.encode(p) for p in prompts], max_new_tokens=block_size - 8,
                       temperature=0, stop_ids=[eos])
    known = set(sentences)
    rows = []
    print("\ngreedy continuations (✓ = a sentence of the corpus):")
    for prompt, ids in zip(prompts, outputs):
        text = prompt + tok.decode(ids)
        hit = text.strip() in known
        rows.append({"prompt": prompt, "continuation": tok.decode(ids), "text": text, "in_corpus": hit})
        print(f"  {'✓' if hit else '✗'} {prompt!r:14} -> {text}")
    n_hit = sum(r["in_corpus"] for r in rows)
    print(f"\n{n_hit}/{len(rows)} continuations reproduce a training sentence")
    write_json(out / "results.json", {"steps": args.steps, "train_loss": result["train_loss"],
                                      "vocab_size": tok.vocab_size, "samples": rows, "reproduced": n_hit})
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a UserError (bad option, bad file) is one line, not a traceback
        from pocketgpt.errors import UserError

        if isinstance(e, UserError):
            print(f"word_gpt: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
