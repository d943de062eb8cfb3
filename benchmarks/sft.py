"""SFT quality on the bundled dialogue data: held-out assistant-token loss before vs after SFT, and sample replies.

    python benchmarks/sft.py [--out runs/bench-sft] [--pretrain-steps 120] [--sft-steps 80] [--n-embd 128] [--threads 1]

1. Conversations: the bundled ``chat`` corpus (chatterbot en/zh, KdConv zh, chitchat en, Dolly open QA samples),
   split by conversation (seeded) into train and held-out.
2. Base model: a BPE tokenizer and a small GPT pretrained (plain next-token prediction, no chat template) on the
   *text* of the training conversations only, so the held-out conversations are unseen text for every model.
3. SFT of that base with ``pocketgpt.train.sft.run_sft`` on the training conversations (chat template, loss on
   assistant tokens only).
4. Held-out assistant-token loss (and perplexity) of the base model vs the SFT model, side by side (the base is
   scored on the same template-rendered held-out conversations, i.e. before any SFT), plus a handful of sample
   replies in English and Chinese, all written into ``OUT/report.md`` (and printed).

The default run is sized for a 2-core CPU (a few minutes); pass larger ``--*-steps`` / ``--n-embd`` for a better
model. Figures vary with machine load only in time, not in loss (seeded).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketgpt import GPT, GPTConfig  # noqa: E402
from pocketgpt.checkpoint import load_model
from pocketgpt.chat import ChatSession  # noqa: E402
from pocketgpt.io import atomic_write_text  # noqa: E402
from pocketgpt.records import read_conversations, split  # noqa: E402
from pocketgpt.train.sft import SFTConfig, assistant_loss, build_examples, run_sft  # noqa: E402
from pocketgpt.train.trainer import TrainConfig, Trainer, world_info  # noqa: E402

SAMPLES = [
    "Hello, how are you?",
    "What is AI?",
    "Do you like music?",
    "Why is the sky blue?",
    "你好",
    "你喜欢什么电影？",
    "什么是人工智能？",
]


class TextStage:
    """Pretraining on one token stream: random windows (a pure function of the step, so resume is exact)."""

    name = "pretrain"

    def __init__(self, train: torch.Tensor, val: torch.Tensor, block: int, batch: int, seed: int):
        self.train, self.val, self.block, self.batch, self.seed = train, val, block, batch, seed

    def _windows(self, data: torch.Tensor, g: torch.Generator):
        ix = torch.randint(0, len(data) - self.block - 1, (self.batch,), generator=g)
        x = torch.stack([data[i: i + self.block] for i in ix])
        y = torch.stack([data[i + 1: i + self.block + 1] for i in ix])
        return x, y

    def get_batch(self, step, micro):
        rank, world, _ = world_info()
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 1000 + micro * world + rank)
        return self._windows(self.train, g)

    def loss(self, model, batch):
        return model(*batch)[1], {}

    def evaluate(self, model):
        g = torch.Generator().manual_seed(0)
        dev = next(model.parameters()).device
        losses = [float(model(x.to(dev), y.to(dev))[1]) for x, y in (self._windows(self.val, g) for _ in range(8))]
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def conv_text(conv) -> str:
    return "\n".join(m["content"] for m in conv)


def write_jsonl(path: Path, convs) -> None:
    atomic_write_text(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-sft", help="run directory (report.md goes here)")
    ap.add_argument("--data", nargs="+", default=["chat"], help="conversation files / bundled names (chat)")
    ap.add_argument("--heldout", type=int, default=80, help="held-out conversations")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--pretrain-steps", type=int, default=120)
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", help="autocast precision (fp32 is fastest for tiny models on a CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731

    # 1. data, split by conversation
    convs = read_conversations(args.data)
    train_convs, held = split(convs, args.heldout / len(convs), args.seed, most=args.heldout)
    write_jsonl(out / "train.jsonl", train_convs)
    write_jsonl(out / "heldout.jsonl", held)
    log(f"{len(train_convs)} training / {len(held)} held-out conversations")

    # 2. tokenizer + base model pretrained on the training conversations' text
    from pocketgpt.tokenizer import Tokenizer

    texts = [conv_text(c) for c in train_convs]
    tok = Tokenizer.train("bpe", texts, args.vocab_size)
    eot = tok.token_id("<|endoftext|>")
    stream = []
    for ids in tok.encode_batch(texts):
        stream += ids + [eot]
    data = torch.tensor(stream, dtype=torch.long)
    n_val = max(len(data) // 20, args.block_size + 2)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=max(1, args.n_embd // 32), n_embd=args.n_embd, pos="rope", bias=False)
    model = GPT(cfg)
    log(f"base model: {model.num_params() / 1e6:.2f}M parameters; pretraining on {len(data):,} tokens")
    pre = TrainConfig(max_steps=args.pretrain_steps, batch_size=args.batch_size, lr=3e-3, min_lr=3e-4,
                      warmup_steps=20, weight_decay=0.1, dtype=args.dtype, eval_interval=0, ckpt_interval=0,
                      log_interval=25, seed=args.seed)
    t = time.time()
    Trainer(model, TextStage(data[:-n_val], data[-n_val:], args.block_size, args.batch_size, args.seed), pre,
            out / "pretrain", tokenizer=tok, resume=False).fit()
    t_pre = time.time() - t
    base_dir = out / "pretrain" / "ckpt"

    # 3. held-out assistant-token loss of the base model (rendered with the chat template)
    held_ex, _ = build_examples(held, tok, args.block_size)
    base = load_model(base_dir)
    before, n_tok = assistant_loss(base, held_ex, tok.pad_id)

    # 4. SFT on the training conversations, evaluated on the same held-out file
    sft = SFTConfig(data=[str(out / "train.jsonl")], val_data=[str(out / "heldout.jsonl")])
    sft_train = TrainConfig(max_steps=args.sft_steps, batch_size=args.batch_size, lr=1e-3, min_lr=1e-4,
                            warmup_steps=10, weight_decay=0.0, dtype=args.dtype, eval_interval=max(args.sft_steps // 4, 1),
                            eval_batches=0, ckpt_interval=0, log_interval=25, seed=args.seed)
    t = time.time()
    result = run_sft(base_dir, out / "sft", sft, sft_train, resume=False, log=log)
    t_sft = time.time() - t
    tuned = load_model(out / "sft" / "ckpt")
    after, _ = assistant_loss(tuned, held_ex, tok.pad_id)

    # 5. sample replies (same seed for both models)
    rows = []
    for prompt in SAMPLES:
        replies = []
        for m in (base, tuned):
            s = ChatSession(m, tok, temperature=0.7, top_k=40, max_new_tokens=48, seed=args.seed)
            replies.append(s.reply_text(prompt).replace("\n", " ").replace("|", "\\|").strip() or "(empty)")
        rows.append((prompt, *replies))

    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    lines = [
        "# SFT benchmark", "",
        f"Data: {', '.join(args.data)} — {len(train_convs)} training / {len(held)} held-out conversations "
        f"({n_tok:,} held-out assistant tokens). Model: {model.num_params() / 1e6:.2f}M parameters "
        f"({args.n_layer} layers, {args.n_embd} dims, context {args.block_size}, BPE {tok.vocab_size}). "
        f"Pretraining {args.pretrain_steps} steps ({t_pre:.0f} s), SFT {args.sft_steps} steps ({t_sft:.0f} s), "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads.", "",
        "| held-out assistant tokens | base (before SFT) | after SFT | ratio |",
        "|---|---|---|---|",
        f"| loss (nats/token) | {fmt(before)} | {fmt(after)} | {after / before:.2f} |",
        f"| perplexity | {math.exp(before):.1f} | {math.exp(after):.1f} | "
        f"{math.exp(after) / math.exp(before):.2f} |", "",
        "Sample replies (temperature 0.7, top-k 40, same seed for both models):", "",
        "| prompt | base | after SFT |", "|---|---|---|",
        *[f"| {p} | {b} | {a} |" for p, b, a in rows], "",
        f"Total wall time {time.time() - t0:.0f} s. SFT data: {json.dumps(result['data']['train'])}", "",
    ]
    report = "\n".join(lines)
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "sft" / "report.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
