"""DPO and GRPO, measured: what each one buys over the model it starts from. Writes RUN/report.md.

DPO (preference pairs, default the bundled HH-RLHF sample ``prefs``):
    tokenizer + tiny GPT ─▶ SFT on prompt + chosen reply ─┬─▶ reward model (Bradley–Terry, the ``rm`` stage)
                                                          └─▶ DPO on the same training pairs
    figure: RM-judged win rate of the DPO policy over the SFT policy on held-out prompts (one sampled reply each,
    same seed; ties count half), beside the RM's own held-out pair accuracy (how far the judge can be trusted) and
    DPO's held-out implicit-reward accuracy / margin.

GRPO (the built-in arithmetic task):
    tiny GPT ─▶ brief SFT on the task format ─▶ GRPO
    figure: greedy exact-answer accuracy on the fixed held-out problems before → after, and the curve over steps.

    python benchmarks/dpo_grpo.py                      # CPU-sized, a few minutes
    python benchmarks/dpo_grpo.py --out runs/bench-rl --dpo-steps 300 --grpo-steps 150 --sft-steps 400
    python benchmarks/dpo_grpo.py --skip-dpo           # only the GRPO half (or --skip-grpo)
    python benchmarks/dpo_grpo.py --pairs synthetic    # DPO on a preference a tiny model (and its RM) can learn
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pocketgpt import GPT, GPTConfig  # noqa: E402
from pocketgpt.tokenizer import Tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_cfg(**kw):
    from pocketgpt.train.trainer import TrainConfig

    base = dict(dtype="fp32", weight_decay=0.0, warmup_steps=0, schedule="constant", progress=False,
                ckpt_interval=0, log_interval=10)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------------------------------
# DPO vs SFT, judged by a reward model


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


POSITIVE = "glad happy sure thanks great kind welcome lovely nice gladly".split()
NEGATIVE = "no bad awful hate ugly sad never rude boring wrong".split()
TOPICS = "cats rain music bread trains books the sea winter coffee gardens maps stars".split()


def synthetic_pairs(n: int, seed: int = 0):
    """Pairs with a learnable preference: the chosen reply is made of friendly words, the rejected one of unfriendly
    words (same prompt, similar lengths)."""
    from pocketgpt.train.reward import Pair

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}."}]
        k = rng.randint(3, 8)
        chosen = " ".join(rng.choice(POSITIVE) for _ in range(k))
        rejected = " ".join(rng.choice(NEGATIVE) for _ in range(k))
        out.append(Pair(prompt, chosen, rejected, f"synthetic:{i + 1}"))
    return out


def dpo_benchmark(out: Path, args) -> dict:
    from pocketgpt.chat import resolve_data
    from pocketgpt.config import load_config
    from pocketgpt.train.dpo import DPOConfig, run_dpo
    from pocketgpt.train.reward import _sections as rm_sections
    from pocketgpt.train.reward import load_reward_model, read_pairs, split_pairs, train_reward_model
    from pocketgpt.train.rl import rollout
    from pocketgpt.train.sft import SFTConfig, run_sft

    t0 = time.time()
    if args.pairs == "synthetic":
        pairs = synthetic_pairs(600)
    else:
        found = resolve_data(args.pairs)
        pairs = []
        for p in (found if isinstance(found, list) else [found]):
            pairs += read_pairs(p)
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    train_p, held_p = split_pairs(pairs, 0.15, seed=0)
    row = lambda p: {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
    train_file = _write_jsonl(out / "pairs_train.jsonl", [row(p) for p in train_p])
    _write_jsonl(out / "pairs_heldout.jsonl", [row(p) for p in held_p])
    # SFT on the chosen replies (the usual recipe); on synthetic pairs on either reply at random, so that the SFT
    # policy is neutral about the preference and DPO has something to learn
    rng = random.Random(0)
    pick = (lambda p: rng.choice((p.chosen, p.rejected))) if args.pairs == "synthetic" else (lambda p: p.chosen)
    sft_file = _write_jsonl(out / "sft.jsonl", [{"messages": p.prompt + [{"role": "assistant", "content": pick(p)}]}
                                                 for p in train_p])
    log(f"dpo bench: {len(train_p)} training pairs, {len(held_p)} held-out prompts")

    texts = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tok = Tokenizer.train("bpe", texts, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=args.block, n_layer=args.layers, n_head=4,
                          n_embd=args.width))
    base = out / "base"
    model.save_pretrained(base)
    tok.save(base / "tokenizer")

    log("dpo bench: SFT on prompt + chosen reply")
    run_sft(base, out / "sft", SFTConfig(data=[str(sft_file)], val_fraction=0.05, overflow="truncate"),
            train_cfg(max_steps=args.sft_steps, batch_size=8, lr=1e-3, min_lr=1e-3, eval_interval=0),
            resume=False, log=lambda s: None)
    sft_ckpt = out / "sft" / "ckpt"

    log("dpo bench: reward model (the judge)")
    rc = load_config(None, {"train.max_steps": args.rm_steps, "train.batch_size": 8, "train.lr": 3e-4,
                            "train.min_lr": 3e-4, "train.warmup_steps": 0, "train.dtype": "fp32",
                            "train.weight_decay": 0.0, "train.eval_interval": 0, "train.ckpt_interval": 0,
                            "train.progress": False, "rm.val_fraction": 0.15}, rm_sections())
    rm_result = train_reward_model(sft_ckpt, train_file, out / "rm", rc, resume=False)

    log("dpo bench: DPO from the SFT model")
    dpo_result = run_dpo(DPOConfig(init=str(sft_ckpt), data=[str(train_file)], beta=args.beta, val_fraction=0.15),
                         out / "dpo", train_cfg(max_steps=args.dpo_steps, batch_size=8, lr=args.dpo_lr,
                                                min_lr=args.dpo_lr, eval_interval=max(1, args.dpo_steps // 4)),
                         resume=False, log=lambda s: None)

    log("dpo bench: sampling both policies on held-out prompts, judging with the reward model")
    rm = load_reward_model(out / "rm" / "ckpt")
    prompts = [p.prompt for p in held_p]
    replies = {}
    for name, ckpt in (("sft", sft_ckpt), ("dpo", out / "dpo" / "ckpt")):
        policy = GPT.from_pretrained(ckpt)
        outs = rollout(policy, tok, prompts, n=1, max_new_tokens=args.reply_tokens, temperature=args.temperature,
                       top_k=50, seed=1234)
        replies[name] = [o for o in outs]
    end = tok.token_id("<|end|>")

    def score(outs) -> list[float]:
        rows = []
        for o in outs:
            ids = list(o.prompt_ids) + [t for t in o.reply_ids if t != end] + [end]
            rows.append(ids[-args.block:])
        with torch.no_grad():
            return rm.score_ids(rows, tok.pad_id)

    s_sft, s_dpo = score(replies["sft"]), score(replies["dpo"])
    wins = sum(1.0 if d > s else 0.5 if d == s else 0.0 for d, s in zip(s_dpo, s_sft))
    evals = [json.loads(l) for l in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "accuracy" in r]
    return {
        "pairs_train": len(train_p), "prompts_heldout": len(held_p),
        "win_rate": wins / len(prompts),
        "rm_mean_sft": sum(s_sft) / len(s_sft), "rm_mean_dpo": sum(s_dpo) / len(s_dpo),
        "len_sft": sum(len(o.reply_ids) for o in replies["sft"]) / len(prompts),
        "len_dpo": sum(len(o.reply_ids) for o in replies["dpo"]) / len(prompts),
        "rm_val_accuracy": rm_result.get("val_accuracy", rm_result.get("accuracy")),
        "dpo_acc_before": evals[0]["accuracy"], "dpo_acc_after": evals[-1]["accuracy"],
        "dpo_margin_after": evals[-1]["margin"],
        "dpo_logp_margin_before": evals[0]["logp_margin"], "dpo_logp_margin_after": evals[-1]["logp_margin"],
        "example": {"prompt": prompts[0][-1]["content"][:200], "sft": replies["sft"][0].text[:200],
                    "dpo": replies["dpo"][0].text[:200]},
        "params": model.num_params(), "seconds": time.time() - t0,
    }


# --------------------------------------------------------------------------------------------------------------------
# GRPO on arithmetic


def grpo_benchmark(out: Path, args) -> dict:
    from pocketgpt.tasks import get_task
    from pocketgpt.cli import main as cli
    from pocketgpt.train.plots import read_metrics
    from pocketgpt.train.sft import SFTConfig, run_sft

    t0 = time.time()
    task = get_task("arithmetic", digits=args.digits, ops=args.ops, n_eval=args.n_eval)
    tok = Tokenizer.train("char", ["What is 0123456789 + - ?"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64))
    base = out / "arith-base"
    model.save_pretrained(base)
    tok.save(base / "tokenizer")
    data = task.write_sft_jsonl(out / "arith-sft.jsonl", 5000, seed=0)
    log(f"grpo bench: brief SFT on the task format ({args.sft_steps} steps)")
    run_sft(base, out / "arith-sft", SFTConfig(data=[str(data)], val_fraction=0.02),
            train_cfg(max_steps=args.sft_steps, batch_size=32, lr=3e-3, min_lr=3e-3, eval_interval=0, grad_clip=0.0),
            resume=False, log=lambda s: None)
    log(f"grpo bench: GRPO ({args.grpo_steps} steps, {args.group_size} replies per prompt)")
    cli(["grpo", "--init", str(out / "arith-sft" / "ckpt"), "--task", "arithmetic", "--task_digits", str(args.digits),
         "--task_ops", args.ops, "--n_eval", str(args.n_eval), "--n", str(args.group_size), "--max_new_tokens", "4",
         "--rollout_prompts", "16", "--batch_size", str(16 * args.group_size), "--max_steps", str(args.grpo_steps),
         "--lr", str(args.grpo_lr), "--min_lr", str(args.grpo_lr), "--eval_interval", "10", "--grad_clip", "0",
         "--ckpt_interval", "0", "--out", str(out / "grpo"), "--restart", "--progress", "false"])
    curve = [(r["step"], r["eval_accuracy"]) for r in read_metrics(out / "grpo") if "eval_accuracy" in r]
    return {"before": curve[0][1], "after": curve[-1][1], "best": max(a for _, a in curve), "curve": curve,
            "n_eval": args.n_eval, "digits": args.digits, "ops": args.ops, "seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------------------------


def write_report(out: Path, dpo: dict | None, grpo: dict | None, args) -> Path:
    lines = ["# DPO and GRPO: measured gains", "",
             f"CPU, {torch.get_num_threads()} thread(s); settings: `{' '.join(sys.argv[1:]) or '(defaults)'}`", ""]
    if dpo:
        lines += [
            "## DPO vs SFT (judged by the reward model)", "",
            f"Data: `{args.pairs}` — {dpo['pairs_train']} training pairs, {dpo['prompts_heldout']} held-out prompts; "
            f"policy {dpo['params'] / 1e6:.2f}M parameters; SFT {args.sft_steps_dpo} steps, RM {args.rm_steps} steps, "
            f"DPO {args.dpo_steps} steps (beta {args.beta}). {dpo['seconds']:.0f} s.", "",
            "| figure | value |", "|---|---:|",
            f"| **RM-judged win rate, DPO over SFT** (held-out prompts, ties = ½) | **{dpo['win_rate']:.3f}** |",
            f"| mean RM score of replies: SFT → DPO | {dpo['rm_mean_sft']:.3f} → {dpo['rm_mean_dpo']:.3f} |",
            f"| mean reply length in tokens: SFT → DPO (RMs tend to favour length) | {dpo['len_sft']:.1f} → "
            f"{dpo['len_dpo']:.1f} |",
            f"| RM held-out pair accuracy (trust in the judge) | {dpo['rm_val_accuracy']:.3f} |",
            f"| DPO held-out implicit-reward accuracy: start → end | {dpo['dpo_acc_before']:.3f} → "
            f"{dpo['dpo_acc_after']:.3f} |",
            f"| DPO held-out chosen−rejected log-prob margin: start → end | {dpo['dpo_logp_margin_before']:.2f} → "
            f"{dpo['dpo_logp_margin_after']:.2f} |", "",
            f"Example — prompt: {dpo['example']['prompt']!r}", "",
            f"- SFT: {dpo['example']['sft']!r}", f"- DPO: {dpo['example']['dpo']!r}", "",
            "Curves: `dpo/accuracy.png`, `dpo/margin.png`, `dpo/logp_margin.png`; judge: `rm/`.", ""]
    if grpo:
        lines += [
            "## GRPO on arithmetic (exact answers, greedy, held-out problems)", "",
            f"Task: {grpo['digits']}-digit `{grpo['ops']}`, {grpo['n_eval']} fixed held-out problems never trained on; "
            f"brief SFT {args.sft_steps} steps, then GRPO {args.grpo_steps} steps. {grpo['seconds']:.0f} s.", "",
            f"**Accuracy before → after: {grpo['before']:.3f} → {grpo['after']:.3f}** (best {grpo['best']:.3f})", "",
            "| step | " + " | ".join(str(s) for s, _ in grpo["curve"]) + " |",
            "|---|" + "---:|" * len(grpo["curve"]),
            "| accuracy | " + " | ".join(f"{a:.3f}" for _, a in grpo["curve"]) + " |", "",
            "![accuracy over steps](grpo/accuracy.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-dpo-grpo")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--skip-grpo", action="store_true")
    # DPO half
    ap.add_argument("--pairs", default="prefs", help="preference pairs file, bundled name (default prefs), or "
                    "'synthetic' (a learnable preference: friendly vs unfriendly words)")
    ap.add_argument("--max-pairs", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--sft-steps-dpo", type=int, default=150)
    ap.add_argument("--rm-steps", type=int, default=100)
    ap.add_argument("--dpo-steps", type=int, default=80)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8)
    # GRPO half
    ap.add_argument("--digits", type=int, default=1)
    ap.add_argument("--ops", default="+")
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--grpo-lr", type=float, default=1e-3)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dpo = None if args.skip_dpo else dpo_benchmark(out, args)
    if dpo:
        print(f"DPO vs SFT: RM-judged win rate {dpo['win_rate']:.3f} on {dpo['prompts_heldout']} held-out prompts "
              f"(RM held-out accuracy {dpo['rm_val_accuracy']:.3f}); DPO implicit-reward accuracy "
              f"{dpo['dpo_acc_before']:.3f} -> {dpo['dpo_acc_after']:.3f}")
    grpo = None if args.skip_grpo else grpo_benchmark(out, args)
    if grpo:
        print(f"GRPO arithmetic: held-out accuracy {grpo['before']:.3f} -> {grpo['after']:.3f} "
              f"(curve {', '.join(f'{s}:{a:.2f}' for s, a in grpo['curve'])})")
    print(f"report: {write_report(out, dpo, grpo, args)}")


if __name__ == "__main__":
    main()
