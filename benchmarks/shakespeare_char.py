"""The shakespeare-char preset on nanoGPT's exact task; its val loss beside nanoGPT's figures.

nanoGPT's task (``data/shakespeare_char/prepare.py``): the raw Tiny Shakespeare, 65 characters, the first 90% of the
characters train (1,003,854 tokens), the last 10% val (111,540) — here ``pocketgpt prepare --kind char --split tail
--raw``. The figure is the loss on the *whole* val split after the run.

    python benchmarks/shakespeare_char.py                          # the preset: a 10-minute budget
    python benchmarks/shakespeare_char.py --steps 540              # a fixed number of steps instead (equal tokens)
    python benchmarks/shakespeare_char.py --steps 150 -- --optimizer adamw --lr 3e-3   # any pretrain override
    python benchmarks/shakespeare_char.py --pauses             # what one evaluation / checkpoint / plot costs

A time budget includes evaluation and checkpoints; other processes on the machine slow it down (figures measured
on a shared machine are pessimistic; a fixed ``--steps`` gives a loss that does not depend on the load).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# measured on the 2-core AVX2 box (issue 17), on this split
NANOGPT = [
    ("nanoGPT train.py/model.py, 4L/256d ctx 128 batch 32, 540 iters (= 2.21M tokens), AdamW, 645 s", 1.747),
    ("nanoGPT's documented CPU recipe (4L/128d, ctx 64, 2000 iters)", 1.88),
    ("pocketgpt before issue 17 (AdamW preset, 10 min: 441 steps, ~20% of it evaluating)", 1.788),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget (default 10)")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of a budget")
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-char.toml"))
    ap.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char-nanogpt"),
                    help="nanoGPT's split (prepared from the bundled Tiny Shakespeare if missing)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-shakespeare-char"), help="run dir (replaced)")
    ap.add_argument("--pauses", action="store_true", help="time one training step, evaluation, checkpoint, best/ "
                                                         "copy and plot of the preset (best of 2), then stop")
    ap.add_argument("overrides", nargs="*", help="pretrain overrides after --, e.g. -- --lr 3e-3")
    a = ap.parse_args()

    import torch

    from pocketgpt.config import load_config
    from pocketgpt.data import builtin_path, prepare
    from pocketgpt.train.pretrain import SECTIONS, build_pretrain, evaluate_lm
    from pocketgpt.train.trainer import Trainer

    data = Path(a.data)
    meta = prepare([builtin_path("shakespeare")], data, kind="char", split="tail", raw=True, verbose=False)
    assert meta["counts"] == {"train": 1_003_854, "val": 111_540}, meta["counts"]  # nanoGPT's split
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    budget = ["--max_steps", str(a.steps), "--max_minutes", "0"] if a.steps else ["--max_minutes", str(a.minutes)]
    cfg = load_config(a.config, ["--data.dir", str(data), *budget, *a.overrides], SECTIONS)
    model, stage, tok = build_pretrain(cfg, out)
    m, t = cfg["model"], cfg["train"]
    opt = f"muon (lr {t.muon_lr}) + AdamW (lr {t.lr})" if t.optimizer == "muon" else f"AdamW (lr {t.lr})"
    print(f"model {m.n_layer}L {m.n_head}H {m.n_embd}d ctx {m.block_size} ({model.num_params() / 1e6:.2f}M params), "
          f"batch {t.batch_size}x{t.grad_accum}, {opt}, {t.schedule} to {t.min_lr} x lr, dtype {t.dtype}, "
          f"{torch.get_num_threads()} threads, " + (f"{a.steps} steps" if a.steps else f"budget {a.minutes} min"))
    t0 = time.time()
    trainer = Trainer(model, stage, t, out, tokenizer=tok, run_config=cfg.to_dict(), resume=False)
    if a.pauses:
        return pauses(trainer, cfg, out)
    result = trainer.fit()
    wall = time.time() - t0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=trainer.dtype, enabled=trainer.dtype != torch.float32):
        full = evaluate_lm(model, stage.val, 32, None, trainer.device, stage.bytes_per_token)  # the whole val split
    print(f"steps {result['step']}, {result['tokens']:,} tokens in {wall / 60:.1f} min "
          f"({result['tok_per_s']:,.0f} tok/s over the run, evaluations and checkpoints included)")
    print(f"\npocketgpt val loss {full['val_loss']:.4f} (whole val split; {full['val_bpb']:.4f} bits/byte, "
          f"perplexity {full['val_ppl']:.2f})")
    for what, loss in NANOGPT:
        print(f"  vs {loss:.3f}  {what}")
    print("what differs from the nanoGPT figures: the optimizer and lr (the preset's), the schedule (sized to the "
          "time budget), the model shape where the preset's differs; the same: raw data, split, 65 characters "
          "(pocketgpt's 7 extra ids — special tokens, <unk> — never occur), the GPT family, the loss on the whole val")
    goal = full["val_loss"] <= 1.55 and not a.steps and a.minutes <= 10
    print(f"goal val <= 1.55 within 10 minutes: {'met' if goal else 'NOT met' if not a.steps else 'n/a (--steps)'}"
          f" (bits/byte = loss / ln 2 here: one byte a token, {full['val_loss'] / math.log(2):.4f})")


def pauses(trainer, cfg, out) -> None:
    """Seconds of a training step and of each thing a run pauses for, best of 2."""
    import torch

    from pocketgpt.train.trainer import Trainer

    model, stage = trainer.model, trainer.stage
    warm = Trainer(model, stage, cfg["train"].model_copy(update={"max_steps": 3, "max_minutes": 0, "eval_interval": 0,
                                                                  "ckpt_interval": 0}), out, resume=False)
    t = time.time()
    warm.fit()
    step = (time.time() - t) / 3  # (includes the final evaluation + checkpoint: an upper bound)

    def best(fn):
        times = []
        for _ in range(2):
            t = time.time()
            fn()
            times.append(time.time() - t)
        return min(times)

    def evaluate():
        model.eval()
        with torch.no_grad():
            stage.evaluate(model)
        model.train()

    n = cfg["train"].eval_batches
    print(f"one training step <= {step:.2f} s; evaluation ({n or 'all'} batches of {stage.batch_size}) "
          f"{best(evaluate):.2f} s; checkpoint {best(trainer.save_checkpoint):.2f} s; best/ copy "
          f"{best(trainer.save_best):.2f} s; plots {best(trainer._plot):.2f} s")


if __name__ == "__main__":
    sys.exit(main())
