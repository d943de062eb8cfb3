"""The speedrun's report card: ``RUN/report.md`` with one table of every stage's figures, plots and sample chats.

Every figure comes from files the run wrote (each stage's ``metrics.jsonl``, ``speedrun_state.json``); a figure
that is missing is written as ``n/a`` rather than invented.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .io import atomic_write_text
from .train.plots import draw_losses, pyplot, read_metrics, save_figure, series


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _first(rows, key):
    for r in rows:
        if isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def _last(rows, key):
    for r in reversed(rows):
        if isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def _mean_tok_s(rows) -> Optional[float]:
    vals = [float(r["tok_per_s"]) for r in rows if isinstance(r.get("tok_per_s"), (int, float)) and r["tok_per_s"] > 0]
    return sum(vals) / len(vals) if vals else None


def plot_overview(run: Path, metrics: dict[str, list[dict]]) -> list[str]:
    """``plots/losses.png`` (training loss of every stage) and ``plots/rewards.png`` (PPO reward/KL, GRPO reward)."""
    if (plt := pyplot()) is None:  # the `plots` extra is not installed
        return []
    written = []
    (run / "plots").mkdir(exist_ok=True)
    stages = [s for s in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo") if metrics.get(s)]
    if stages:
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        for ax, s in zip(axes.flat, ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")):
            draw_losses(ax, metrics.get(s, []))
            ax.set_title(s)
        fig.tight_layout()
        save_figure(fig, run / "plots" / "losses.png", dpi=90)
        written.append("plots/losses.png")

    curves = [(s, k) for s, ks in (("ppo", ("reward", "kl")), ("grpo", ("reward", "val_accuracy", "accuracy")),
                                   ("dpo", ("val_reward_accuracy", "val_margin")))
              for k in ks if series(metrics.get(s, []), k)[0]]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
        for ax, (s, k) in zip(axes[0], curves):
            x, y = series(metrics[s], k)
            ax.plot(x, y, lw=1.2)
            ax.set_title(f"{s}: {k}")
            ax.set_xlabel("step")
        fig.tight_layout()
        save_figure(fig, run / "plots" / "rewards.png", dpi=90)
        written.append("plots/rewards.png")
    return written


def collect_figures(run: Path, state: dict) -> tuple[list[tuple[str, ...]], dict[str, list[dict]]]:
    """Rows of (stage, figure, value, tokens/s, wall s, peak MB) for the report table, and each stage's metrics."""
    metrics = {s: read_metrics(run / s) for s in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")}
    done = state.get("done", {})
    ev = done.get("eval", {})

    def res(stage):
        d = done.get(stage, {})
        return _fmt(d.get("wall_s"), 1), _fmt(d.get("peak_rss_mb"), 0)

    rows = []

    def add(stage, figure, value, tok=None):
        w, m = res(stage)
        rows.append((stage, figure, value, _fmt(tok, 0) if tok is not None else "", w, m))

    add("tokenizer", "vocabulary size", _fmt(state.get("vocab_size")))
    add("prepare", "training tokens", _fmt(state.get("train_tokens")))
    m = metrics["pretrain"]
    vl = _last(m, "val_loss")
    add("pretrain", "val loss / perplexity", f"{_fmt(vl)} / {_fmt(math.exp(vl) if vl is not None else None, 1)}",
        _mean_tok_s(m))
    m = metrics["sft"]
    add("sft", "held-out assistant loss (first eval → last)",
        f"{_fmt(_first(m, 'val_loss'))} → {_fmt(_last(m, 'val_loss'))}", _mean_tok_s(m))
    m = metrics["rm"]
    acc_key = next((k for k in ("val_accuracy", "val_acc", "accuracy") if _last(m, k) is not None), "val_accuracy")
    add("rm", "held-out pairwise accuracy", _fmt(_last(m, acc_key)), _mean_tok_s(m))
    add("ppo", "mean RM reward: PPO vs SFT (held-out)", f"{_fmt(ev.get('ppo_rm_reward'))} vs {_fmt(ev.get('sft_rm_reward'))}",
        _mean_tok_s(metrics["ppo"]))
    add("ppo", "RM-judged win rate vs SFT", _fmt(ev.get("ppo_win_rate_vs_sft")))
    add("dpo", "mean RM reward: DPO vs SFT (held-out)", f"{_fmt(ev.get('dpo_rm_reward'))} vs {_fmt(ev.get('sft_rm_reward'))}",
        _mean_tok_s(metrics["dpo"]))
    add("dpo", "RM-judged win rate vs SFT", _fmt(ev.get("dpo_win_rate_vs_sft")))
    add("grpo", "arithmetic exact-answer accuracy (greedy): SFT → GRPO",
        f"{_fmt(ev.get('arith_acc_sft'))} → {_fmt(ev.get('arith_acc_grpo'))}", _mean_tok_s(metrics["grpo"]))
    add("eval", "held-out prompts judged", _fmt(ev.get("heldout_prompts")))
    return rows, metrics


def write_report(sr) -> Path:
    """Write ``RUN/report.md`` for a ``Speedrun`` (its ``out``, ``state``, ``preset_name``)."""
    run: Path = sr.out
    state = sr.state
    # a few facts read from the artefacts themselves
    from .io import read_json

    tok_json = run / "tokenizer"
    if (run / "data" / "meta.json").exists():
        meta = read_json(run / "data" / "meta.json")
        state["vocab_size"] = meta.get("vocab_size")
        state["train_tokens"] = (meta.get("counts") or {}).get("train")
    elif tok_json.exists():
        state["vocab_size"] = None

    rows, metrics = collect_figures(run, state)
    plots = plot_overview(run, metrics)
    total = sum(v.get("wall_s", 0) for k, v in state.get("done", {}).items() if k != "report")
    peak = max((v.get("peak_rss_mb") or 0) for v in state.get("done", {}).values()) if state.get("done") else None

    lines = [
        f"# pocketgpt speedrun report — preset `{sr.preset_name}`",
        "",
        f"Total wall time: **{total / 60:.1f} min**; peak memory of any stage: **{_fmt(peak, 0)} MB** (max RSS).",
        "",
        "| stage | figure | value | tokens/s | wall s | peak MB |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    for s in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo"):
        if (run / s / "loss.png").exists():
            lines.append(f"- {s}: [{s}/loss.png]({s}/loss.png)")
    ev = state.get("done", {}).get("eval", {})
    if ev.get("samples"):
        lines += ["", "## Sample chats (greedy)", ""]
        for smp in ev["samples"]:
            a = smp["assistant"].replace("\n", " ").strip() or "(empty)"
            lines.append(f"- **{smp['model']}** — user: {smp['user']}  \n  assistant: {a}")
    if ev.get("heldout_examples"):
        lines += ["", "## Held-out preference prompts (sampled, as judged by the RM)", ""]
        for ex in ev["heldout_examples"]:
            lines.append(f"- user: {ex['user'].replace(chr(10), ' ')}")
            for n in ("sft", "ppo", "dpo"):
                if n in ex:
                    lines.append(f"  - {n}: {ex[n].replace(chr(10), ' ') or '(empty)'}")
    lines += ["", "## Commands run", ""]
    for name, info in state.get("done", {}).items():
        if info.get("command"):
            lines.append(f"- `{info['command']}`")
    lines += [
        "",
        "## Next",
        "",
        f"- chat: `pocketgpt chat --ckpt {run / 'dpo' / 'ckpt'}`",
        f"- serve: `pocketgpt serve --ckpt {run / 'dpo' / 'ckpt'}`",
        "",
    ]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
