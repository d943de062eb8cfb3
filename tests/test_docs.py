"""The READMEs' command blocks run as written, so the docs cannot drift from the code.

A fenced block opened with ```` ```bash runnable ```` is run line by line, in order, in a fresh directory (through
``pocketgpt.cli.main`` in this process: one torch import for all). Training commands get tiny overrides appended
(``TINY``), ``pocketgpt serve`` loads its model and app but does not listen, ``torchrun`` lines (GPUs, ``data/big``)
are skipped, and the files a user brings (``my_chats.jsonl``, ``prompts.jsonl``, ...) are written first. The CI
version runs the English block up to the first fine-tuning; the whole of both blocks is marked slow.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from pocketgpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "README.zh-CN.md")

_STEPS = ["--max_steps", "2", "--eval_interval", "0", "--batch_size", "2", "--max_minutes", "0", "--progress", "false"]
TINY = {  # appended to a documented command: same command, seconds instead of minutes
    "pretrain": _STEPS + ["--block_size", "32", "--n_layer", "1", "--n_embd", "32", "--n_head", "2"],
    "sft": _STEPS, "rm": _STEPS, "ppo": _STEPS, "dpo": _STEPS, "grpo": _STEPS,
    "sample": ["--max-new-tokens", "8"],
    "chat": ["--max-new-tokens", "8"],
}
SLOW_FROM = "sft"  # the CI version stops before this command


def runnable_blocks(readme: str) -> list[str]:
    text = (ROOT / readme).read_text(encoding="utf-8")
    return re.findall(r"^```bash runnable\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    out = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] != "torchrun":
            assert argv[0] == "pocketgpt", f"a runnable block runs pocketgpt commands only: {line}"
            out.append(argv[1:])
    return out


def _user_files(d: Path) -> None:
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("Hi!", "Hello."), ("你好", "你好！"), ("What is 2+2?", "4")]]
    (d / "my_chats.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), "utf-8")
    (d / "prompts.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": "你好"}\n', encoding="utf-8")
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}
    (d / "pairs.jsonl").write_text(json.dumps(pair) + "\n", encoding="utf-8")
    (d / "my_rewards.py").write_text("def score(prompt, reply):\n    return float(len(reply) > 3)\n")


def run_readme(readme: str, tmp_path: Path, monkeypatch, stop_before: str | None = None) -> int:
    import pocketgpt.serve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pocketgpt.serve, "serve_forever", lambda app, host, port: None)
    _user_files(tmp_path)
    ran = 0
    for block in runnable_blocks(readme):
        for argv in commands(block):
            if argv[0] == stop_before:
                return ran
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("hello\n".encode())))  # for chat
            full = argv + TINY.get(argv[0], [])
            if argv[:3] == ["speedrun", "--preset", "cpu-small"]:
                full = ["speedrun", "--preset", "cpu-tiny", "--out", "runs/speedrun"]  # the documented smoke run
            assert main(full) == 0, f"{readme}: pocketgpt {' '.join(full)}"
            ran += 1
    return ran


def test_readmes_mark_their_pipeline_runnable():
    for readme in READMES:
        (block,) = runnable_blocks(readme)
        assert len(commands(block)) >= 15 and "speedrun" in block


def test_readme_states_the_chat_defaults():
    from pocketgpt.chat import CHAT_DEFAULTS

    d = CHAT_DEFAULTS
    assert (f"temperature {d['temperature']}, top-k {d['top_k']} and a mild repetition penalty of "
            f"{d['repetition_penalty']}") in " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def test_readme_pipeline_start_runs(tmp_path, monkeypatch):
    assert run_readme("README.md", tmp_path, monkeypatch, stop_before=SLOW_FROM) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("readme", READMES)
def test_readme_blocks_run_as_written(readme, tmp_path, monkeypatch):
    assert run_readme(readme, tmp_path, monkeypatch) >= 15
