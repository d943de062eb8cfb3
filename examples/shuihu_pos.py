"""水浒传 (Water Margin): learned absolute positions vs rotary embeddings (RoPE), side by side.

    python examples/shuihu_pos.py            # 2 x 300 steps of a 4-layer char-level GPT (a few minutes on a CPU)
    python examples/shuihu_pos.py --quick    # a tiny model on the first 16 sections (what the tests run)
    python examples/shuihu_pos.py --steps 1000 --device cuda

Two configs that differ only in ``[model] pos`` (``examples/configs/shuihu-learned.toml`` and
``shuihu-rope.toml``) are trained on the same shards (the bundled 水浒传, character tokenizer), with the same seed
and the same budget, through the library's pretraining path (``load_config`` → ``build_pretrain`` → ``Trainer``).

Outputs in ``--out`` (default ``runs/examples/shuihu_pos``): ``data/`` (shards + tokenizer), ``learned/`` and
``rope/`` (run directories with ``ckpt/``, ``metrics.jsonl``, ``loss.png``), ``val_loss.png`` (both validation
curves on one plot) and ``summary.json`` (final validation losses, times, samples).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {"learned": HERE / "configs" / "shuihu-learned.toml", "rope": HERE / "configs" / "shuihu-rope.toml"}
PROMPTS = ["话说", "宋江", "武松"]
QUICK = {  # a tiny model and budget for tests / CI: the same for both runs
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 32,
    "train.max_steps": 60, "train.warmup_steps": 10, "train.eval_interval": 20, "train.eval_batches": 4,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Learned positions vs RoPE on 水浒传: two runs, one plot.")
    p.add_argument("--out", default="runs/examples/shuihu_pos", help="output directory "
                   "(default runs/examples/shuihu_pos)")
    p.add_argument("--quick", action="store_true", help="tiny model, 60 steps, first 16 sections (tests/CI)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each run (default: the configs' "
                   "max_steps, 300; 60 with --quick)")
    p.add_argument("--sections", type=int, default=None,
                   help="use only the first N of the 165 sections of the book (default all; 16 with --quick)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--sample-tokens", type=int, default=None, help="characters per sample (default 80; 30 quick)")
    return p.parse_args(argv)


def source_text(args, out: Path) -> Path:
    """The bundled book, or its first ``--sections`` lines written to ``out/source/``."""
    from pocketgpt.data import builtin_path, read_text_file
    from pocketgpt.errors import UserError
    from pocketgpt.io import atomic_write_text

    path = builtin_path("shuihu")
    n = args.sections if args.sections is not None else (16 if args.quick else None)
    if n is None:
        return path
    lines = [line for line in read_text_file(path).splitlines() if line.strip()]
    if n < 2:
        raise UserError(f"--sections: must be >= 2 (the book has {len(lines)}), got {n}")
    part = out / "source" / f"shuihu-first-{n}.txt"
    atomic_write_text(part, "\n".join(lines[:n]) + "\n")
    return part


def plot_val_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    """One PNG with the validation-loss curve of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pocketgpt.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, "o-", ms=3, label=f"pos = {name} (final {losses[-1]:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pocketgpt import GPT, GPTConfig, Tokenizer, generate
    from pocketgpt.checkpoint import load_model
    from pocketgpt.config import load_config
    from pocketgpt.data import prepare
    from pocketgpt.errors import UserError
    from pocketgpt.io import write_json
    from pocketgpt.train.plots import read_metrics
    from pocketgpt.train.pretrain import DataConfig, build_pretrain, evaluate_lm
    from pocketgpt.train.trainer import TrainConfig, Trainer

    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps: must be a positive integer, got {args.steps}")
    out = Path(args.out)

    # the same shards for both runs
    src = source_text(args, out)
    meta = prepare([src], out / "data", kind="char", val_fraction=0.1, force=True, verbose=False)
    print(f"data: {src.name} -> {meta['counts']['train']:,} train / {meta['counts']['val']:,} val characters, "
          f"vocab {meta['vocab_size']:,} (char tokenizer) in {out / 'data'}")

    overrides: dict = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        overrides["train.max_steps"] = args.steps
    overrides["data.dir"] = str(out / "data")
    overrides["train.device"] = args.device
    sections = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}

    summary: dict = {"data": {"source": src.name, **meta["counts"], "vocab_size": meta["vocab_size"]}, "runs": {}}
    curves = {}
    for name, path in CONFIGS.items():
        cfg = load_config(path, overrides, sections)
        run_dir = out / name
        model, stage, tok = build_pretrain(cfg, run_dir)  # seeds with [train] seed: both start alike
        tcfg = cfg["train"]
        trainer = Trainer(model, stage, tcfg, run_dir, tokenizer=tok, run_config=cfg.to_dict(), resume=False)
        with torch.no_grad():  # the untrained model's loss, so both curves start at step 0
            model.eval()
            start = evaluate_lm(model, stage.val, tcfg.batch_size, tcfg.eval_batches, trainer.device)["val_loss"]
            model.train()
        m = cfg["model"]
        print(f"\n[{name}] {path.name}: pos={m.pos}, {m.n_layer} layers x {m.n_embd}, context {m.block_size}, "
              f"{model.num_params() / 1e6:.2f}M parameters, {tcfg.max_steps} steps; val loss at step 0 {start:.3f}")
        t0 = time.time()
        result = trainer.fit()
        seconds = time.time() - t0
        steps, losses = [0], [start]
        for r in read_metrics(run_dir):
            if "val_loss" in r:
                steps.append(r["step"])
                losses.append(r["val_loss"])
        curves[name] = (steps, losses)
        summary["runs"][name] = {"config": str(path), "pos": m.pos, "params": model.num_params(),
                                 "steps": result["step"], "val_loss": result.get("val_loss", float("nan")),
                                 "val_ppl": result.get("val_ppl", float("nan")), "best_val_loss": min(losses),
                                 "train_loss": result["train_loss"], "seconds": round(seconds, 1),
                                 "val_curve": {"step": steps, "val_loss": losses}}
        print(f"[{name}] done in {seconds:.1f}s: val loss {summary['runs'][name]['val_loss']:.4f}")

    plot = out / "val_loss.png"
    plot_val_curves(curves, plot, f"Shuihu (Water Margin), char level: learned positions vs RoPE, "
                                  f"{summary['runs']['rope']['steps']} steps")
    summary["plot"] = plot.name

    print(f"\n{'pos':8} {'params':>8} {'steps':>6} {'val loss':>9} {'val ppl':>8} {'best':>7} {'time':>7}")
    for name, r in summary["runs"].items():
        print(f"{name:8} {r['params'] / 1e6:7.2f}M {r['steps']:6d} {r['val_loss']:9.4f} {r['val_ppl']:8.2f} "
              f"{r['best_val_loss']:7.4f} {r['seconds']:6.1f}s")
    a, b = summary["runs"]["learned"]["val_loss"], summary["runs"]["rope"]["val_loss"]
    if math.isfinite(a) and math.isfinite(b):
        print(f"RoPE - learned: {b - a:+.4f} nats/char")
    print(f"plot: {plot}")

    # a few samples from each final model (same prompts, same seed)
    n_new = args.sample_tokens or (30 if args.quick else 80)
    summary["samples"] = {}
    for name in CONFIGS:
        ckpt = out / name / "ckpt"
        model = load_model(ckpt).eval()
        tok = Tokenizer.load(ckpt / "tokenizer")
        rows = generate(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=n_new, temperature=0.8, top_k=40,
                        seed=1337, stop_ids=[tok.eos_id])
        summary["samples"][name] = [p + tok.decode(ids) for p, ids in zip(PROMPTS, rows)]
        print(f"\nsamples, pos = {name}:")
        for text in summary["samples"][name]:
            print("  " + text.replace("\n", " "))
    write_json(out / "summary.json", summary)
    print(f"\nwrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a UserError (bad option, bad file) is one line, not a traceback
        from pocketgpt.errors import UserError

        if isinstance(e, UserError):
            print(f"shuihu_pos: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
