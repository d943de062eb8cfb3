"""The main job end to end: `pocketgpt speedrun --preset cpu-tiny` (the CI-sized pipeline) and its report card."""

import json
import math
import re

import pytest

from conftest import run_cli

STAGE_DIRS = ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"]


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    # first invocation stops after pretraining; the second must skip what is done and finish the rest
    first = run_cli("speedrun", "--preset", "cpu-tiny", "--out", out, "--stop-after", "pretrain", timeout=900)
    assert "run the same command again" in first.stderr
    assert not (out / "sft").exists()
    second = run_cli("speedrun", "--preset", "cpu-tiny", "--out", out, timeout=900)
    return out, first, second


def _table(report: str) -> list[list[str]]:
    rows = []
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| stage") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_speedrun_resumes_by_stage(speedrun):
    out, first, second = speedrun
    for stage in ("tokenizer", "prepare", "pretrain"):
        assert f"{stage}: done earlier, skipped" in second.stderr
    state = json.loads((out / "speedrun_state.json").read_text())
    assert list(state["done"]) == ["tokenizer", "prepare", "pretrain", "sft", "rm", "ppo", "dpo", "grpo", "eval",
                                   "report"]


def test_speedrun_artefacts_exist(speedrun):
    out, _, second = speedrun
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert (out / "data" / "train.bin").exists() and (out / "data" / "meta.json").exists()
    for stage in STAGE_DIRS:
        ckpt = out / stage / "ckpt"
        assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists(), stage
        assert (ckpt / "tokenizer").is_dir(), stage
        assert (out / stage / "metrics.jsonl").stat().st_size > 0, stage
        assert (out / stage / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stage
    assert (out / "rm" / "ckpt" / "reward_head.safetensors").exists()
    for png in ("plots/losses.png", "plots/rewards.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    # it ends by telling the user how to talk to the result
    assert f"pocketgpt chat --ckpt {out / 'dpo' / 'ckpt'}" in second.stdout
    assert f"pocketgpt serve --ckpt {out / 'dpo' / 'ckpt'}" in second.stdout


def test_report_figures_are_real_numbers_from_this_run(speedrun):
    out, _, _ = speedrun
    report = (out / "report.md").read_text(encoding="utf-8")
    rows = _table(report)
    assert len(rows) >= 10
    num = re.compile(r"-?\d[\d,]*(\.\d+)?")
    for stage, figure, value, tok_s, wall, peak in rows:
        assert "n/a" not in value, (stage, figure, value)
        assert num.search(value), (stage, figure, value)
        assert float(wall) > 0, (stage, wall)
        assert float(peak.replace(",", "")) > 0, (stage, peak)
    by = {(r[0], r[1]): r for r in rows}
    # the figures are the run's own: cross-check against the files the stages wrote
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert by[("tokenizer", "vocabulary size")][2] == str(meta["vocab_size"])
    pre = [json.loads(l) for l in (out / "pretrain" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = [r["val_loss"] for r in pre if "val_loss" in r][-1]
    loss_s, ppl_s = by[("pretrain", "val loss / perplexity")][2].split(" / ")
    assert abs(float(loss_s) - val) < 1e-3 and abs(float(ppl_s) - math.exp(val)) < 0.1
    assert val < math.log(meta["vocab_size"]) - 0.5  # better than uniform guessing: it learned, even at this size
    state = json.loads((out / "speedrun_state.json").read_text())
    ev = state["done"]["eval"]
    for k in ("sft_rm_reward", "ppo_rm_reward", "dpo_rm_reward", "ppo_win_rate_vs_sft", "dpo_win_rate_vs_sft",
              "arith_acc_sft", "arith_acc_grpo"):
        assert isinstance(ev[k], float) and math.isfinite(ev[k]), k
    assert 0.0 <= ev["dpo_win_rate_vs_sft"] <= 1.0
    assert "## Sample chats" in report and "你好" in report


@pytest.mark.slow
def test_cpu_small_speedrun_within_twenty_minutes(tmp_path):
    """The README's main job (`make demo`): the default preset end to end within its 20-minute promise."""
    import time

    t0 = time.time()
    p = run_cli("speedrun", "--out", tmp_path / "run", timeout=1800)
    minutes = (time.time() - t0) / 60
    assert minutes <= 20.0, f"cpu-small took {minutes:.1f} min"
    rows = _table((tmp_path / "run" / "report.md").read_text(encoding="utf-8"))
    assert rows and all("n/a" not in r[2] for r in rows)
    assert "pocketgpt chat --ckpt" in p.stdout
