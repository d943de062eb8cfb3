"""`pocketgpt eval`: lm-evaluation-harness runs pocketgpt (model `pocketgpt`) on a local multiple-choice task and its
accuracy equals the one pocketgpt's own scorer (`engine.score` over the choices) gives; `lm_eval`'s command line
finds the model through `python -m pocketgpt.evaluate`; `generate_until` stops at stop strings and special tokens,
`loglikelihood` knows a greedy continuation; a rolling task's bits-per-byte equals `eval --text`'s, and
`--text` is the model's own loss on a text that fits one window. No download: the task and data are written here."""

import json
import math
import os
import random
import sys

import pytest
import torch

from conftest import ROOT
from pocketgpt.cli import main
from pocketgpt.checkpoint import save_model
from pocketgpt.engine import score
from pocketgpt.model import GPT, GPTConfig
from pocketgpt.tokenizer import Tokenizer

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "music", "seven", "garden", "winter", "小猫", "月亮"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    items = []
    for i in range(30):
        choices = rng.sample(WORDS, 4)
        items.append({"question": f"Q{i}: which word comes after {rng.choice(WORDS)}? A:", "choices": choices,
                      "answer": rng.randrange(4)})
    (d / "mc.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
    story = " ".join(rng.choice(WORDS) for _ in range(120)) + "\n"  # several context windows long
    (d / "story.txt").write_text(story, encoding="utf-8")
    (d / "story.jsonl").write_text(json.dumps({"text": story}, ensure_ascii=False) + "\n", encoding="utf-8")
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: pocket_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "story.yaml").write_text(
        f"task: pocket_story\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'story.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    tok = Tokenizer.train("char", ["".join(WORDS) + " Q0123456789:?A which word comes after\n"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_model(model, d / "ckpt")
    tok.save(d / "ckpt" / "tokenizer")
    return d, items, model.eval(), tok


def own_accuracy(model, tok, items):
    """pocketgpt's scorer: sum of log p(" " + choice | <|endoftext|> question) per choice, argmax = the answer?"""
    right = []
    for x in items:
        prompt = [tok.eos_id] + tok.encode(x["question"])
        replies = [tok.encode(" " + c) for c in x["choices"]]
        sums = [sum(lp) for lp in score(model, [prompt] * 4, replies)]
        right.append(max(range(4), key=sums.__getitem__) == x["answer"])
    return sum(right) / len(right)


def env(d):
    return {"HF_DATASETS_CACHE": str(d / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_lm_eval_accuracy_equals_pocketgpts_own_scorer(setup, monkeypatch, capsys):
    d, items, model, tok = setup
    want = own_accuracy(model, tok, items)
    assert 0 < want < 1  # a random model: some right, some wrong
    for k, v in env(d).items():
        monkeypatch.setenv(k, v)
    assert main(["eval", str(d / "ckpt"), "--tasks", "pocket_mc,pocket_story", "--include_path", str(d / "tasks"),
                 "--out", str(d / "res.json")]) == 0
    res = json.loads((d / "res.json").read_text())
    assert res["pocket_mc"]["acc"] == pytest.approx(want, abs=1e-9) and res["pocket_mc"]["n"] == len(items)
    assert 0 < res["pocket_mc"]["acc_stderr"] < 0.5

    # bits per byte: lm-eval's rolling task over the story == pocketgpt eval --text on the same text
    capsys.readouterr()
    assert main(["eval", str(d / "ckpt"), "--text", str(d / "story.txt"), "--out", str(d / "text.json")]) == 0
    text = json.loads((d / "text.json").read_text())
    assert res["pocket_story"]["bits_per_byte"] == pytest.approx(text["bits_per_byte"], rel=1e-6)
    assert text["tokens"] > 2 * 64 and text["bytes"] == len((d / "story.txt").read_bytes())
    assert f"bits/byte {text['bits_per_byte']:.4f}" in capsys.readouterr().out


def test_lm_eval_command_line_finds_model_pocketgpt(setup):
    """lm-eval's own command line, with --model pocketgpt (the CLI route for lm-eval 0.4.13)."""
    d, items, model, tok = setup
    import subprocess

    out = d / "cli"
    subprocess.run([sys.executable, "-m", "pocketgpt.evaluate", "--model", "pocketgpt", "--model_args",
                    f"ckpt={d / 'ckpt'}", "--batch_size", "4", "--tasks", "pocket_mc", "--include_path",
                    str(d / "tasks"), "--output_path", str(out), "--limit", "10"], check=True, capture_output=True,
                   cwd=ROOT, env={**os.environ, **env(d)}, timeout=300)
    (results,) = out.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["pocket_mc"]["acc,none"]
    assert acc == pytest.approx(own_accuracy(model, tok, items[:10]), abs=1e-9)


def test_eval_text_is_the_models_loss_on_a_text_in_one_window(setup, tmp_path):
    d, _, model, tok = setup
    text = "seven tigers, 小猫 and the moon\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    from pocketgpt.evaluate import text_metrics

    res = text_metrics(d / "ckpt", tmp_path / "t.txt")
    ids = tok.encode(text)
    logp = sum(score(model, [[tok.eos_id]], [ids])[0])
    assert res["loss"] == pytest.approx(-logp / len(ids), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(-logp / math.log(2) / len(text.encode()), rel=1e-5)


def test_eval_errors_are_one_line(setup, capsys):
    d = setup[0]
    assert main(["eval", str(d / "ckpt"), "--tasks", "no_such_task", "--include_path", str(d / "tasks")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"pocketgpt eval: error: --tasks: unknown task 'no_such_task' under {d / 'tasks'}")
    assert main(["eval", str(d / "ckpt")]) == 2
    assert capsys.readouterr().err == ("pocketgpt eval: error: give a checkpoint and one of --data DIR, --text FILE "
                                       "or --tasks T1,T2\n")


def test_harness_model_generates_greedily_until_a_stop_and_knows_greedy_continuations(setup):
    d, _, model, tok = setup
    from types import SimpleNamespace

    from pocketgpt.engine import generate
    from pocketgpt.evaluate import PocketGPTLM

    lm = PocketGPTLM(str(d / "ckpt"))
    ctx = "Q7: which word comes after river? A:"
    prompt = [tok.eos_id] + tok.encode(ctx)
    ids = generate(model, [prompt], temperature=0, max_new_tokens=20)[0]
    special = set(tok.special_ids.values())
    cut = next(i for i, t in enumerate(ids) if t in special)  # this random model soon writes a special token
    free = tok.decode(ids[:cut])
    assert free
    for until, want in ((["never"], free), ([free[-2:]], free[:free.index(free[-2:])])):
        (out,) = lm.generate_until([SimpleNamespace(args=(ctx, {"until": until, "max_gen_toks": 20}))])
        assert out == want  # special tokens end it, as the stop strings do, and are never text
    other = ("z" if free[0] != "z" else "y") + free[1:]
    (greedy, g), (_, not_g) = lm.loglikelihood([SimpleNamespace(args=(ctx, free)), SimpleNamespace(args=(ctx, other))])
    assert g is True and not_g is False
    assert greedy == pytest.approx(sum(score(model, [prompt], [tok.encode(free)])[0]), rel=1e-5)


def test_speedrun_standard_tasks_section_runs_local_tasks_and_names_missing_ones(setup, monkeypatch):
    from pocketgpt.report import standard_task_figs
    from pocketgpt.speedrun import standard_tasks

    d, items, model, tok = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    st = standard_tasks({"sft": d / "ckpt"}, ["pocket_mc", "no_such_task"], include=d / "tasks", limit=10)
    acc = st["results"]["sft"]["pocket_mc"]["acc"]
    assert acc == pytest.approx(own_accuracy(model, tok, items[:10]), abs=1e-9)
    assert list(st["unavailable"]) == ["no_such_task"] and "no_such_task" in st["unavailable"]["no_such_task"]
    figs = standard_task_figs(st)
    f = figs["sft/pocket_mc/acc"]
    assert f["value"] == acc and f["n"] == 10 and f["ci95"][0] < acc < f["ci95"][1]
