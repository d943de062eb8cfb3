"""The speedrun's report card: ``RUN/report.md`` and ``RUN/report.json``, every figure read from the run's files.

Figures are ``{"value", "n", "ci95"}`` (Wilson or ±1.96 SE intervals); a stage "beats" its baseline only when its
interval clears it. Details: docs/internals.md.
"""

from __future__ import annotations

import json
import math
from itertools import groupby
from pathlib import Path
from typing import Optional

from .io import atomic_write_text, read_json, write_json
from .train.plots import draw_losses, pyplot, read_metrics, save_figure, series

POLICIES = ("sft", "ppo", "dpo", "grpo")
TRAINED = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo", "rm_hh")
GAIN_GOAL = 0.10  # issue 14: each RL stage raises held-out accuracy by >= 10 points over SFT
RM_GOAL = 0.85  # issue 14: the task reward model's held-out pairwise accuracy


def fig(value, n: Optional[int] = None, ci95=None) -> dict:
    return {"value": value, "n": n, "ci95": ci95}


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def _ci(f: Optional[dict], digits: int = 3) -> str:
    """``0.412 [0.364, 0.461] (n=400)``"""
    if not f or f.get("value") is None:
        return "n/a"
    s = _fmt(f["value"], digits)
    if f.get("ci95"):
        s += f" [{_fmt(f['ci95'][0], digits)}, {_fmt(f['ci95'][1], digits)}]"
    if f.get("n") is not None:
        s += f" (n={f['n']})"
    return s


def _at(rows, key, i: int = -1):
    """The first (``i=0``) or last number logged under ``key``, or None."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return vals[i] if vals else None


# ---- statistics of the report (95% intervals) -----------------------------------------------------------------------


def wilson(k: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion k/n (the interval stays inside [0, 1] and is sane at 0 and n)."""
    if n <= 0:
        return [float("nan"), float("nan")]
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def proportion(hits: list[bool] | list[float]) -> dict:
    """``{"value", "n", "ci95"}`` of a proportion (Wilson interval)."""
    n, k = len(hits), float(sum(1.0 if h else 0.0 for h in hits))
    return {"value": k / n if n else float("nan"), "n": n, "ci95": wilson(k, n)}


def mean_ci(xs: list[float]) -> dict:
    """``{"value", "n", "ci95"}`` of a mean (normal approximation: mean ± 1.96 standard errors)."""
    n = len(xs)
    if n == 0:
        return {"value": float("nan"), "n": 0, "ci95": [float("nan"), float("nan")]}
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    h = 1.96 * sd / math.sqrt(n)
    return {"value": m, "n": n, "ci95": [m - h, m + h]}


def paired_diff(a: list[float], b: list[float]) -> dict:
    """Mean of ``a - b`` over the same items, with its 95% interval (paired: both models answer the same prompts)."""
    return mean_ci([float(x) - float(y) for x, y in zip(a, b)])


def distinct_n(texts: list, n: int = 2) -> dict:
    """distinct-n: distinct n-grams / all n-grams over the replies (1.0 = no n-gram repeats; near 0 = loops)."""
    grams, total = set(), 0
    for t in texts:
        for i in range(len(t) - n + 1):
            grams.add(tuple(t[i: i + n]))
            total += 1
    return {"value": len(grams) / total if total else float("nan"), "n": total, "ci95": None}


def longest_run(tokens: list) -> int:
    """The longest run of one token repeated back to back (a reply "degenerates" when this is most of it)."""
    return max((len(list(g)) for _, g in groupby(tokens)), default=0)


# ---- figures --------------------------------------------------------------------------------------------------------


def collect(run: Path, state: dict) -> dict[str, dict[str, dict]]:
    """Every figure of the report, ``{stage: {metric: fig}}`` (what report.json holds)."""
    done = state.get("done", {})
    ev = done.get("eval", {})
    metrics = {s: read_metrics(run / s) for s in TRAINED}
    figs: dict[str, dict[str, dict]] = {}

    def stage(name) -> dict:
        d = figs.setdefault(name, {})
        info = done.get(name, {})
        if "wall_s" in info:
            d["wall_s"] = fig(info["wall_s"])
        if info.get("peak_rss_mb"):
            d["peak_rss_mb"] = fig(info["peak_rss_mb"])
        return d

    meta = read_json(run / "data" / "meta.json") if (run / "data" / "meta.json").exists() else {}
    stage("tokenizer")["vocab_size"] = fig(meta.get("vocab_size"))
    stage("prepare")["train_tokens"] = fig((meta.get("counts") or {}).get("train"))
    vl = _at(metrics["pretrain"], "val_loss")
    speeds = [r["tok_per_s"] for r in metrics["pretrain"] if r.get("tok_per_s", 0) > 0]
    stage("pretrain").update(val_loss=fig(vl), val_perplexity=fig(math.exp(vl) if vl is not None else None),
                             steps=fig(_at(metrics["pretrain"], "step")),
                             tok_per_s=fig(sum(speeds) / len(speeds) if speeds else None))
    stage("sft").update(val_loss_first=fig(_at(metrics["sft"], "val_loss", 0)),
                        val_loss_last=fig(_at(metrics["sft"], "val_loss")), steps=fig(_at(metrics["sft"], "step")))

    d = stage("pairs")
    for split in ("train", "heldout"):
        if (run / f"pairs_{split}.stats.json").exists():
            st = read_json(run / f"pairs_{split}.stats.json")
            for key in ("prompts", "pairs", "prompts_with_pairs"):
                d[f"{split}_{key}"] = fig(st[key])
            k = round(st["sample_accuracy"] * st["replies"])
            d[f"{split}_sample_accuracy"] = proportion([True] * k + [False] * (st["replies"] - k))

    per = ev.get("per_model", {})
    for name in [n for n in POLICIES if n in per]:
        r = per[name]
        d = stage(name)
        d.update(heldout_accuracy=proportion(r["correct"]), rm_score=mean_ci(r["rm_scores"]),
                 kl_to_sft=mean_ci(r["kl"]), reply_tokens=mean_ci([float(x) for x in r["lengths"]]))
        if name != "sft" and "sft" in per:
            d["accuracy_gain_vs_sft"] = paired_diff(r["correct"], per["sft"]["correct"])
            d["rm_score_gain_vs_sft"] = paired_diff(r["rm_scores"], per["sft"]["rm_scores"])
        if name != "sft":
            d["steps"] = fig(_at(metrics[name], "step"))
    for name, key in (("rm", "rm_heldout"), ("rm_hh", "rm_hh_heldout")):
        if key in ev:
            stage(name).update(heldout_pairwise_accuracy=proportion(ev[key]["correct"]),
                               heldout_margin=mean_ci(ev[key]["margins"]), steps=fig(_at(metrics[name], "step")))
    if ev.get("samples"):
        d = stage("eval")
        d["sample_chats"] = fig(len(ev["samples"]))
        # distinct-2 over the model's own tokens (words would not split Chinese); per model as well
        d["distinct_2"] = distinct_n([s.get("token_ids", []) for s in ev["samples"]])
        for m in dict.fromkeys(s["model"] for s in ev["samples"]):
            d[f"distinct_2_{m}"] = distinct_n([s.get("token_ids", []) for s in ev["samples"] if s["model"] == m])
        d["degenerate_replies"] = proportion([_degenerate(s) for s in ev["samples"]])
        d["empty_replies"] = proportion([s["assistant"] == "" for s in ev["samples"]])
    if ev.get("standard_tasks", {}).get("results"):
        figs["standard_tasks"] = standard_task_figs(ev["standard_tasks"])
    total = sum(v.get("wall_s", 0) for k, v in done.items() if k != "report")
    figs["speedrun"] = {"total_wall_s": fig(round(total, 1)),
                        "peak_rss_mb": fig(max((v.get("peak_rss_mb") or 0) for v in done.values()) if done else None)}
    return figs


def _degenerate(sample: dict) -> bool:
    """One token repeated back to back for most of a reply of some length ("我我我我…", "I I I I ...")."""
    n = sample.get("tokens", 0)
    return n >= 4 and sample.get("longest_run", 0) >= max(4, n // 2)


# ---- verdicts in words ----------------------------------------------------------------------------------------------


def verdicts(figs: dict) -> list[str]:
    out = []
    rm = figs.get("rm", {}).get("heldout_pairwise_accuracy")
    if rm:
        ok = "meets" if rm["value"] >= RM_GOAL else "**misses**"
        side = "above chance" if rm["ci95"][0] > 0.5 else "**not above chance**"
        out.append(f"- Task reward model: held-out pairwise accuracy {_ci(rm)} — {side}; {ok} the {RM_GOAL:.2f} goal.")
    for name in ("ppo", "dpo", "grpo"):
        g = figs.get(name, {}).get("accuracy_gain_vs_sft")
        if not g:
            continue
        lo, hi = g["ci95"]
        if lo > 0:
            head = "beat SFT"
        elif hi < 0:
            head = "**made held-out accuracy worse than SFT**"
        else:
            head = "**did not beat SFT** (the interval includes 0)"
        pts = f"{100 * g['value']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        goal = "meets" if g["value"] >= GAIN_GOAL else "**misses**"
        out.append(f"- {name.upper()} {head}: {pts}; held-out accuracy {_ci(figs[name]['heldout_accuracy'])}; {goal} "
                   f"the +{100 * GAIN_GOAL:.0f}-point goal.")
    hh = figs.get("rm_hh", {}).get("heldout_pairwise_accuracy")
    if hh:
        lo, hi = hh["ci95"]
        what = ("above chance" if lo > 0.5 else "**below chance**" if hi < 0.5 else
                "**chance level** (the interval includes 0.5): telling helpful-and-harmless replies apart is beyond "
                "a model of this size trained on a few hundred pairs; it is kept to show what the chat RM is")
        out.append(f"- HH-RLHF (chat) reward model: held-out pairwise accuracy {_ci(hh)} — {what}.")
    ev = figs.get("eval", {})
    if ev.get("degenerate_replies"):
        k = round(ev["degenerate_replies"]["value"] * ev["degenerate_replies"]["n"])
        out.append(f"- Sample chats: {k} of {ev['degenerate_replies']['n']} replies degenerate into one repeated "
                   f"token; distinct-2 (tokens) {_fmt(ev['distinct_2']['value'])}.")
    return out


# ---- plots ----------------------------------------------------------------------------------------------------------


def plot_overview(run: Path, metrics: dict[str, list[dict]]) -> list[str]:
    """``plots/losses.png`` (every stage's losses), ``plots/rewards.png`` (RL curves) and
    ``plots/ppo_rm_vs_accuracy.png``: the reward model's score and the checker's accuracy over PPO steps."""
    if (plt := pyplot()) is None:  # the `plots` extra is not installed
        return []
    written = []
    (run / "plots").mkdir(exist_ok=True)

    def save(f, name: str, dpi: int = 80) -> None:
        f.tight_layout()
        save_figure(f, run / "plots" / name, dpi=dpi)
        written.append(f"plots/{name}")

    if any(metrics.get(s) for s in TRAINED):
        fig_, axes = plt.subplots(2, 4, figsize=(16, 7))
        for ax, s in zip(axes.flat, TRAINED):
            draw_losses(ax, metrics.get(s, []))
            ax.set_title(s)
        axes.flat[-1].axis("off")
        save(fig_, "losses.png")

    wanted = (("ppo", ("objective/scores", "reward", "objective/kl", "kl")),
              ("grpo", ("reward", "eval_accuracy", "accuracy", "val_accuracy")),
              ("dpo", ("eval_rewards/accuracies", "val_reward_accuracy", "eval_rewards/margins", "val_margin")),
              ("rm", ("eval_accuracy", "val_accuracy")))
    curves = [(s, k) for s, ks in wanted for k in ks if series(metrics.get(s, []), k)[0]]
    if curves:
        fig_, axes = plt.subplots(1, len(curves), figsize=(3.8 * len(curves), 3.2), squeeze=False)
        for ax, (s, k) in zip(axes[0], curves):
            x, y = series(metrics[s], k)
            ax.plot(x, y, lw=1.2)
            ax.set_title(f"{s}: {k}", fontsize=9)
            ax.set_xlabel("step")
        save(fig_, "rewards.png")

    m = metrics.get("ppo", [])
    rx, ry = series(m, "eval_reward")
    ax_, ay = series(m, "eval_accuracy")
    if rx or ax_:
        fig_, a1 = plt.subplots(figsize=(6.5, 3.6))
        if rx:
            a1.plot(rx, ry, "o-", color="tab:blue", ms=3, label="reward-model score (what PPO optimises)")
        a1.set_xlabel("PPO step")
        a1.set_ylabel("mean RM score, held-out greedy replies", color="tab:blue", fontsize=8)
        if ax_:
            a2 = a1.twinx()
            a2.plot(ax_, ay, "s-", color="tab:red", ms=3, label="true accuracy (checker, not optimised)")
            a2.set_ylabel("held-out accuracy (checker)", color="tab:red", fontsize=8)
            a2.set_ylim(0, 1)
        else:
            a1.set_title("(this ppo logs no eval_accuracy: the checker's curve is missing)", fontsize=8)
        fig_.legend(loc="lower right", fontsize=7)
        save(fig_, "ppo_rm_vs_accuracy.png", dpi=90)
    return written


# ---- the report -----------------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """A reply exactly as written (JSON-quoted: spaces, newlines and repeats stay visible; nothing stripped)."""
    return "`" + json.dumps(text, ensure_ascii=False).replace("`", "\\`") + "`"


def standard_task_figs(st: dict) -> dict[str, dict]:
    """``{"MODEL/TASK/METRIC": fig}`` from ``speedrun.standard_tasks``; an interval where lm-eval gives a stderr."""
    out = {}
    for model, tasks in st["results"].items():
        for task, metrics in tasks.items():
            for key, v in metrics.items():
                if key == "n" or key.endswith("_stderr"):
                    continue
                se = metrics.get(f"{key}_stderr")
                ci = [v - 1.96 * se, v + 1.96 * se] if isinstance(se, (int, float)) else None
                out[f"{model}/{task}/{key}"] = fig(v, metrics.get("n"), ci)
    return out


def write_report(sr) -> Path:
    """Write ``RUN/report.md`` and ``RUN/report.json`` for a ``Speedrun`` (its ``out``, ``state``, ``preset_name``)."""
    run: Path = sr.out
    figs = collect(run, sr.state)
    plots = plot_overview(run, {s: read_metrics(run / s) for s in TRAINED})
    write_json(run / "report.json", figs)
    ev = sr.state.get("done", {}).get("eval", {})
    try:
        task_desc = f"{sr.task_name()} {json.dumps(sr.task_options())}"
    except Exception:  # noqa: BLE001 - a report of a run directory from another version
        task_desc = "n/a"
    sp = figs["speedrun"]
    lines = [
        f"# pocketgpt speedrun report — preset `{sr.preset_name}`",
        "",
        f"Total wall time: **{sp['total_wall_s']['value'] / 60:.1f} min**; peak memory of any stage: "
        f"**{_fmt(sp['peak_rss_mb']['value'], 0)} MB** (max RSS). Every stage runs on a step budget, so "
        f"the figures do not depend on the machine's speed; only the wall times do. Every figure is also in "
        f"`report.json`; intervals are 95% (Wilson for proportions).",
        "",
        "## Did each stage beat its baseline?",
        "",
        *verdicts(figs),
        "",
        f"## RLHF against ground truth: task `{task_desc}`",
        "",
        f"Held-out prompts: {ev.get('heldout_prompts', 'n/a')} (the task's fixed held-out set: no stage trains on "
        "them). "
        "Accuracy = greedy reply checked by the task; RM score = the task reward model's mean score of the same "
        "replies; KL = KL(model ‖ SFT) in nats per reply, estimated on one temperature-1 sample per prompt; "
        "gain = paired difference against SFT on the same prompts.",
        "",
        "| model | held-out accuracy [95% CI] | gain vs SFT (points) | RM score | KL to SFT | reply tokens | steps "
        "| wall s |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for name in POLICIES:
        d = figs.get(name, {})
        if "heldout_accuracy" not in d:
            continue
        gain = d.get("accuracy_gain_vs_sft")
        gain_s = (f"{100 * gain['value']:+.1f} [{100 * gain['ci95'][0]:+.1f}, {100 * gain['ci95'][1]:+.1f}]"
                  if gain else "(baseline)")
        lines.append(f"| {name.upper()} | {_ci(d['heldout_accuracy'])} | {gain_s} | {_ci(d['rm_score'], 2)} | "
                     f"{_ci(d['kl_to_sft'], 3)} | {_fmt(d['reply_tokens']['value'], 1)} | "
                     f"{_fmt((d.get('steps') or {}).get('value'), 0)} | "
                     f"{_fmt((d.get('wall_s') or {}).get('value'), 1)} |")
    p = figs.get("pairs", {})
    lines += [
        "",
        "Preference pairs, collected as RLHF collects them: the SFT model samples replies (temperature 1) to task "
        "prompts, the checker labels them, a right reply is paired with a wrong one of the same prompt. Training "
        "pairs come from training prompts only; held-out pairs from the held-out prompts.",
        "",
        "| pairs | prompts | prompts with a pair | pairs | SFT sample accuracy |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for split in ("train", "heldout"):
        if f"{split}_pairs" in p:
            lines.append(f"| {split} | {p[f'{split}_prompts']['value']} | "
                         f"{p[f'{split}_prompts_with_pairs']['value']} | {p[f'{split}_pairs']['value']} | "
                         f"{_ci(p[f'{split}_sample_accuracy'])} |")

    st = ev.get("standard_tasks")
    if st:
        lines += ["", "## Standard tasks (lm-evaluation-harness, where available locally)", ""]
        lines += [f"- {k}: {_ci(f)} (n = {f.get('n')})" for k, f in figs.get("standard_tasks", {}).items()]
        lines += [f"- {t}: not available locally ({why})" for t, why in st.get("unavailable", {}).items()]
    lines += ["", "## Every stage", "", "| stage | figure | value | wall s | peak MB |",
              "| --- | --- | --- | ---: | ---: |"]
    for stage, d in figs.items():
        if stage not in ("speedrun", "standard_tasks"):  # their own sections list them
            w, pk = _fmt((d.get("wall_s") or {}).get("value"), 1), _fmt((d.get("peak_rss_mb") or {}).get("value"), 0)
            lines += [f"| {stage} | {key} | {_ci(f)} | {w} | {pk} |" for key, f in d.items()
                      if key not in ("wall_s", "peak_rss_mb")]
    lines += ["", "## Plots", "", *(f"![{pl}]({pl})" for pl in plots)]
    if "plots/ppo_rm_vs_accuracy.png" in plots:
        lines += ["", "`plots/ppo_rm_vs_accuracy.png`: if the reward-model score rises while the true accuracy does "
                      "not, PPO is hacking the reward model."]
    lines += [f"- {s}: [{s}/loss.png]({s}/loss.png)" for s in TRAINED if (run / s / "loss.png").exists()]
    per = ev.get("per_model", {})
    if per:
        lines += ["", "## Held-out task replies (greedy, first prompts)", ""]
        for i, ex in enumerate(per.get("sft", {}).get("examples", [])):
            lines.append(f"- user: {ex['user']}")
            for name in POLICIES:
                if name in per and i < len(per[name]["examples"]):
                    lines.append(f"  - {name}: {_quote(per[name]['examples'][i]['reply'])}")
    if ev.get("samples"):
        lines += ["", "## Sample chats (sampled with `pocketgpt chat`'s defaults; replies exactly as written)", ""]
        lines += [f"- **{smp['model']}** — user: {smp['user']}  \n  assistant: {_quote(smp['assistant'])}"
                  for smp in ev["samples"]]
    lines += ["", "## Commands run", "", *(f"- `{cmd}`" for info in sr.state.get("done", {}).values()
                                          for cmd in str(info.get("command", "")).splitlines() if cmd)]
    chat = str(sr.table("speedrun").get("chat_model", "dpo"))
    lines += ["", "## Next", "", f"- chat: `pocketgpt chat --ckpt {run / chat / 'ckpt'}`",
              f"- serve: `pocketgpt serve --ckpt {run / chat / 'ckpt'}`", ""]
    atomic_write_text(run / "report.md", "\n".join(lines))
    return run / "report.md"
