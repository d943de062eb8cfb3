"""The main job end to end: `pocketgpt speedrun --preset cpu-tiny` (the CI-sized pipeline) and its report card."""

import json
import math
import re

import pytest

from conftest import run_cli

STAGE_DIRS = ["pretrain", "sft", "rm", "ppo", "dpo", "grpo", "rm_hh"]
STAGES = ["tokenizer", "prepare", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "grpo", "rm_hh", "eval", "report"]


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    # first invocation stops after pretraining; the second must skip what is done and finish the rest
    first = run_cli("speedrun", "--preset", "cpu-tiny", "--out", out, "--stop-after", "pretrain", timeout=900)
    assert "run the same command again" in first.stderr
    assert not (out / "sft").exists()
    second = run_cli("speedrun", "--preset", "cpu-tiny", "--out", out, timeout=900)
    return out, first, second


def test_speedrun_resumes_by_stage(speedrun):
    out, first, second = speedrun
    for stage in ("tokenizer", "prepare", "pretrain"):
        assert f"{stage}: done earlier, skipped" in second.stderr
    state = json.loads((out / "speedrun_state.json").read_text())
    assert list(state["done"]) == STAGES


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
    for png in ("plots/losses.png", "plots/rewards.png", "plots/ppo_rm_vs_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    # it ends by telling the user how to talk to the result
    assert f"pocketgpt chat --ckpt {out / 'dpo' / 'ckpt'}" in second.stdout
    assert f"pocketgpt serve --ckpt {out / 'dpo' / 'ckpt'}" in second.stdout


def _is_fig(f):
    return set(f) == {"value", "n", "ci95"} and (f["ci95"] is None or len(f["ci95"]) == 2)


def test_report_json_has_every_stage_figures(speedrun):
    out, _, _ = speedrun
    figs = json.loads((out / "report.json").read_text())
    state = json.loads((out / "speedrun_state.json").read_text())
    for stage in STAGES[:-2]:
        assert figs[stage]["wall_s"]["value"] == state["done"][stage]["wall_s"] > 0, stage
    for stage, metrics in figs.items():
        for key, f in metrics.items():
            assert _is_fig(f), (stage, key, f)
    heldout = figs["sft"]["heldout_accuracy"]["n"]
    assert heldout == state["done"]["eval"]["heldout_prompts"] == 40
    for name in ("sft", "ppo", "dpo", "grpo"):
        d = figs[name]
        for key in ("heldout_accuracy", "rm_score", "kl_to_sft", "reply_tokens"):
            f = d[key]
            assert f["n"] == heldout and math.isfinite(f["value"]), (name, key)
            lo, hi = f["ci95"]
            assert lo <= f["value"] <= hi, (name, key, f)
        # the accuracy is the checker's verdict on each greedy reply; its interval is Wilson's
        correct = state["done"]["eval"]["per_model"][name]["correct"]
        assert d["heldout_accuracy"]["value"] == sum(correct) / len(correct)
        assert 0.0 <= d["heldout_accuracy"]["ci95"][0] and d["heldout_accuracy"]["ci95"][1] <= 1.0
    assert figs["sft"]["kl_to_sft"]["value"] == 0.0
    for name in ("ppo", "dpo", "grpo"):
        assert figs[name]["accuracy_gain_vs_sft"]["n"] == heldout
    for rm in ("rm", "rm_hh"):
        f = figs[rm]["heldout_pairwise_accuracy"]
        assert f["n"] > 0 and 0.0 <= f["ci95"][0] <= f["value"] <= f["ci95"][1] <= 1.0
    # the pairs: counts as the pairs files hold them, no held-out prompt among the training pairs
    train = [json.loads(l) for l in (out / "pairs_train.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (out / "pairs_heldout.jsonl").read_text().splitlines()]
    assert figs["pairs"]["train_pairs"]["value"] == len(train) > 0
    assert figs["pairs"]["heldout_pairs"]["value"] == len(held) == figs["rm"]["heldout_pairwise_accuracy"]["n"]
    from pocketgpt.tasks import get_task

    task = get_task("arithmetic", digits=1, ops="+", n_eval=40)
    eval_qs = {p[-1]["content"] for p in task.eval_prompts()}
    assert not {r["prompt"][-1]["content"] for r in train} & eval_qs
    assert {r["prompt"][-1]["content"] for r in held} <= eval_qs
    assert 0.0 < figs["eval"]["distinct_2"]["value"] <= 1.0 and figs["eval"]["sample_chats"]["value"] == 10


def test_report_figures_are_real_numbers_from_this_run(speedrun):
    out, _, _ = speedrun
    report = (out / "report.md").read_text(encoding="utf-8")
    figs = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert figs["tokenizer"]["vocab_size"]["value"] == meta["vocab_size"]
    pre = [json.loads(l) for l in (out / "pretrain" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = [r["val_loss"] for r in pre if "val_loss" in r][-1]
    assert abs(figs["pretrain"]["val_loss"]["value"] - val) < 1e-9
    assert val < math.log(meta["vocab_size"]) - 0.5  # better than uniform guessing: it learned, even at this size
    # the table of policies and the verdicts in words, with their intervals
    assert re.search(r"\| SFT \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \(n=40\) \| \(baseline\)", report)
    for name in ("PPO", "DPO", "GRPO"):
        assert re.search(rf"^\| {name} \| \d\.\d{{3}} \[", report, re.M), name
        assert re.search(rf"^- {name} (beat SFT|\*\*did not beat SFT\*\*|\*\*made held-out accuracy worse)", report,
                         re.M), name
    assert "HH-RLHF (chat) reward model: held-out pairwise accuracy" in report
    assert "## Sample chats" in report and "你好" in report
    # replies are quoted exactly as written, nothing stripped
    state = json.loads((out / "speedrun_state.json").read_text())
    for smp in state["done"]["eval"]["samples"]:
        assert json.dumps(smp["assistant"], ensure_ascii=False) in report


def test_report_says_when_a_stage_did_not_beat_its_baseline():
    from pocketgpt.report import verdicts
    from pocketgpt.report import paired_diff, proportion

    worse = {"heldout_accuracy": proportion([False] * 300 + [True] * 100),
             "accuracy_gain_vs_sft": paired_diff([0.0] * 100 + [1.0] * 300, [1.0] * 100 + [1.0] * 300)}
    same = {"heldout_accuracy": proportion([True] * 200 + [False] * 200),
            "accuracy_gain_vs_sft": paired_diff([1.0, 0.0] * 200, [0.0, 1.0] * 200)}
    better = {"heldout_accuracy": proportion([True] * 300 + [False] * 100),
              "accuracy_gain_vs_sft": paired_diff([1.0] * 300 + [0.0] * 100, [1.0] * 200 + [0.0] * 200)}
    rm = {"heldout_pairwise_accuracy": proportion([True] * 52 + [False] * 48)}
    lines = verdicts({"ppo": worse, "dpo": same, "grpo": better, "rm": rm, "rm_hh": rm})
    text = "\n".join(lines)
    assert "PPO **made held-out accuracy worse than SFT**: -25.0 points [" in text
    assert "DPO **did not beat SFT** (the interval includes 0): +0.0 points [" in text
    assert "GRPO beat SFT: +25.0 points [+" in text and "meets the +10-point goal" in text
    assert "**not above chance**" in text and "**misses** the 0.85 goal" in text
    assert "**chance level** (the interval includes 0.5)" in text


def test_wilson_interval():
    from pocketgpt.report import wilson

    lo, hi = wilson(120, 400)
    assert abs(lo - 0.2572) < 1e-3 and abs(hi - 0.3466) < 1e-3  # textbook values
    assert wilson(0, 10)[0] == 0.0 and 0.27 < wilson(0, 10)[1] < 0.28
    assert wilson(10, 10)[1] == 1.0


@pytest.mark.slow
def test_cpu_small_speedrun_within_twenty_minutes(tmp_path):
    """The README's main job (`make demo`): the default preset end to end within its 20-minute promise."""
    import time

    t0 = time.time()
    p = run_cli("speedrun", "--out", tmp_path / "run", timeout=1800)
    minutes = (time.time() - t0) / 60
    assert minutes <= 20.0, f"cpu-small took {minutes:.1f} min"
    figs = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "pocketgpt chat --ckpt" in p.stdout
    # issue 14's goals: every RL stage proven against the checker on >= 300 held-out prompts / pairs
    sft, rm = figs["sft"]["heldout_accuracy"], figs["rm"]["heldout_pairwise_accuracy"]
    assert sft["n"] >= 300 and 0.20 <= sft["value"] <= 0.70, sft
    assert rm["n"] >= 300 and rm["value"] >= 0.85, rm
    for stage in ("ppo", "dpo", "grpo"):
        assert figs[stage]["accuracy_gain_vs_sft"]["value"] >= 0.10, (stage, figs[stage]["accuracy_gain_vs_sft"])
        assert "value" in figs[stage]["kl_to_sft"], stage
