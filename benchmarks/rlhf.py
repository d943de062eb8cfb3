"""RLHF quality: reward-model accuracy on HH-RLHF pairs, and PPO policy vs SFT policy judged by that reward model.

    python benchmarks/rlhf.py                       # ~5 min on a 2-core CPU: tiny SFT → RM → PPO, all in one run
    python benchmarks/rlhf.py --sft runs/sft/ckpt   # start from your own SFT checkpoint (its tokenizer is used)
    python benchmarks/rlhf.py --sft-steps 600 --rm-steps 400 --ppo-steps 120 --n-layer 6 --n-embd 192   # longer

Data: the bundled HH-RLHF harmless-base pairs (``prefs``), split once by a fixed seed into training pairs and
held-out pairs. Without ``--sft`` a tiny chat model is first fine-tuned from scratch on the training pairs' prompts +
chosen replies (plus Dolly open-QA) — small, so every figure below is a *relative* measurement made in one run.

Figures (printed side by side and written to OUT/report.md):
* RM held-out pairwise accuracy (chance = 0.5), trained from the SFT checkpoint on the training pairs;
* on the held-out prompts, with the same sampling settings and seed for both policies: mean RM reward of the SFT
  policy and of the PPO policy, the PPO policy's win rate against the SFT policy (RM-judged, ties count ½), the KL
  of the PPO policy to the SFT policy, and the PPO run's peak RSS.
"""

from __future__ import annotations

import sys

import argparse
import gzip
import json
import random
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_hh(out: Path, n_val: int, seed: int = 0) -> tuple[dict, int]:
    """Write train/val pair files, the SFT conversations of the train pairs, and the prompt files."""
    from pocketgpt.data import builtin_path

    with gzip.open(builtin_path("prefs"), "rt", encoding="utf-8") as f:
        pairs = [json.loads(l) for l in f if l.strip()]
    random.Random(seed).shuffle(pairs)
    val, train = pairs[:n_val], pairs[n_val:]
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("pairs_train", "pairs_val", "sft_train", "prompts_train",
                                                       "prompts_val")}
    with open(paths["pairs_train"], "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in train)
    with open(paths["pairs_val"], "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in val)
    with open(paths["sft_train"], "w") as f:
        f.writelines(json.dumps({"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]}) + "\n"
                     for p in train)
    with open(paths["prompts_train"], "w") as f:
        f.writelines(json.dumps({"prompt": p["prompt"]}) + "\n" for p in train)
    with open(paths["prompts_val"], "w") as f:
        f.writelines(json.dumps({"prompt": p["prompt"]}) + "\n" for p in val)
    return paths, len(train)


def make_sft(args, out: Path, paths: dict) -> Path:
    """Tokenizer + tiny GPT from scratch, fine-tuned on the train pairs' chosen replies (+ Dolly)."""
    from pocketgpt import GPT, GPTConfig
    from pocketgpt.checkpoint import load_model, save_model
    from pocketgpt.data import builtin_path
    from pocketgpt.tokenizer import Tokenizer
    from pocketgpt.train.sft import SFTConfig, run_sft
    from pocketgpt.train.trainer import TrainConfig

    texts = []
    for p in (paths["sft_train"], builtin_path("dolly")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                texts += [m["content"] for m in json.loads(line)["messages"]]
    tok = Tokenizer.train("bpe", texts, args.vocab_size)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=max(1, args.n_embd // 32), n_embd=args.n_embd)
    init = out / "init"
    save_model(GPT(cfg), init)
    tok.save(init / "tokenizer")
    sft = SFTConfig(data=[str(paths["sft_train"]), "dolly"], val_fraction=0.05, val_max=50)
    train = TrainConfig(max_steps=args.sft_steps, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                        weight_decay=0.0, eval_interval=0, ckpt_interval=0, log_interval=20, seed=0,
                        dtype="fp32")
    res = run_sft(init, out / "sft", sft, train, resume=False, log=log)
    log(f"sft: val_loss {res.get('val_loss', float('nan')):.3f}")
    return out / "sft" / "ckpt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-rlhf", help="work directory (report.md is written here)")
    ap.add_argument("--sft", help="an SFT checkpoint to start from (default: fine-tune a tiny one first)")
    ap.add_argument("--val-pairs", type=int, default=60, help="held-out HH pairs (their prompts judge PPO)")
    ap.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts used to compare the policies")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--rm-steps", type=int, default=100)
    ap.add_argument("--ppo-steps", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=3)
    ap.add_argument("--n-embd", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pocketgpt import GPT
    from pocketgpt.config import load_config
    from pocketgpt.tokenizer import load_tokenizer_for
    from pocketgpt.train import ppo as ppo_mod
    from pocketgpt.train import reward as rm_mod
    from pocketgpt.records import read_prompts

    out = Path(args.out)
    t0 = time.time()
    paths, n_train = split_hh(out / "data", args.val_pairs)
    log(f"HH-RLHF pairs: {n_train} train, {args.val_pairs} held out")
    sft_ckpt = Path(args.sft) if args.sft else make_sft(args, out, paths)
    t_sft = time.time() - t0

    # ---- reward model -------------------------------------------------------------------------------------------
    t1 = time.time()
    rm_cfg = load_config("rm-tiny", {"train.max_steps": args.rm_steps, "train.lr": 1e-4, "train.min_lr": 1e-5,
                                      "train.eval_interval": 0, "train.ckpt_interval": 0, "train.dtype": "fp32"},
                         rm_mod.SECTIONS)
    rm_res = rm_mod.train_reward_model(sft_ckpt, paths["pairs_train"], out / "rm", rm_cfg,
                                       val_data=paths["pairs_val"], resume=False)
    rm_acc = rm_res["val_accuracy"]
    train_acc = rm_mod.score_file(out / "rm" / "ckpt", paths["pairs_train"], device="cpu")["accuracy"]
    t_rm = time.time() - t1

    # ---- PPO ----------------------------------------------------------------------------------------------------
    t2 = time.time()
    ev_prompts, ev_lines = read_prompts(paths["prompts_val"])
    ev_prompts, ev_lines = ev_prompts[: args.eval_prompts], ev_lines[: args.eval_prompts]
    ev_file = out / "data" / "prompts_eval.jsonl"
    ev_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ev_prompts))
    ppo_cfg = load_config("ppo-tiny", {"train.max_steps": args.ppo_steps, "train.eval_interval": 0,
                                       "train.ckpt_interval": 0, "train.lr": 2e-5, "train.min_lr": 2e-5,
                                       "ppo.max_new_tokens": args.max_new_tokens,
                                       "ppo.temperature": args.temperature},
                          ppo_mod.SECTIONS)
    ppo_res = ppo_mod.train_ppo(sft_ckpt, paths["prompts_train"], out / "ppo", ppo_cfg,
                                reward_ckpt=out / "rm" / "ckpt", eval_prompts_path=ev_file, resume=False)
    t_ppo = time.time() - t2

    # ---- SFT vs PPO on the held-out prompts, same sampling settings and seed --------------------------------------
    tok = load_tokenizer_for(sft_ckpt)
    cfg = ppo_cfg["ppo"]
    scorer = ppo_mod.Scorer(reward_ckpt=out / "rm" / "ckpt")
    sft_model = load_model(sft_ckpt)
    records = [f"{ev_file}:{i + 1}" for i in range(len(ev_prompts))]
    res_sft = ppo_mod.evaluate_policy(sft_model, tok, ev_prompts, records, scorer, cfg, reference=sft_model)
    res_ppo = ppo_mod.evaluate_policy(load_model(out / "ppo" / "ckpt"), tok, ev_prompts, records, scorer,
                                      cfg, reference=sft_model)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(res_ppo["scores"], res_sft["scores"]))
    win_rate = wins / len(ev_prompts)

    rows = [
        ("RM held-out pairwise accuracy (HH-RLHF, chance 0.5)", f"{rm_acc:.3f}", f"train pairs: {train_acc:.3f}"),
        ("mean RM reward on held-out prompts", f"SFT {res_sft['reward']:+.3f}", f"PPO {res_ppo['reward']:+.3f}"),
        ("PPO win rate vs SFT (RM-judged, ties ½)", f"{win_rate:.3f}", f"{len(ev_prompts)} prompts"),
        ("KL(PPO ‖ SFT) per reply, nats", f"{res_ppo['kl']:.3f}", ""),
        ("mean reply length, tokens", f"SFT {res_sft['reply_len']:.1f}", f"PPO {res_ppo['reply_len']:.1f}"),
        ("PPO peak RSS", f"{ppo_res['peak_rss_mb']:.0f} MB", ""),
        ("wall time: SFT / RM / PPO", f"{t_sft:.0f} s / {t_rm:.0f} s / {t_ppo:.0f} s", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}}  figures")
    for name, a, b in rows:
        print(f"{name:{w}}  {a:<16} {b}")
    n_params = load_model(sft_ckpt).num_params()
    md = [
        "# RLHF benchmark (benchmarks/rlhf.py)",
        "",
        f"SFT checkpoint: `{sft_ckpt}` ({n_params / 1e6:.2f}M parameters); HH-RLHF harmless pairs: {n_train} train, "
        f"{args.val_pairs} held out; RM {args.rm_steps} steps; PPO {args.ppo_steps} steps "
        f"(sampling: temperature {args.temperature}, {args.max_new_tokens} new tokens, same seed for both policies).",
        "",
        "| figure | value | |",
        "|---|---|---|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        "## Samples (first 3 held-out prompts)",
        "",
    ]
    for i in range(min(3, len(ev_prompts))):
        md += [f"**prompt:** {ev_prompts[i][-1]['content'][:200]!r}", "",
               f"- SFT ({res_sft['scores'][i]:+.2f}): {res_sft['texts'][i][:200]!r}",
               f"- PPO ({res_ppo['scores'][i]:+.2f}): {res_ppo['texts'][i][:200]!r}", ""]
    from pocketgpt.io import atomic_write_text

    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "ppo" / "report.md", "\n".join(md) + "\n")
    print(f"report: {out / 'report.md'} (total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
