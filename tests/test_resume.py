"""Exact resume for every stage: SIGKILL a run after it wrote a checkpoint, run the same command again, and its
metrics curve (minus timing fields) and final weights equal an uninterrupted run's, bitwise on CPU fp32.

``check_exact_resume(argv, run_dir)`` is stage-agnostic: add a case to ``STAGES`` (a function of the tiny inputs
returning the argv of ``pocketgpt STAGE ...`` without ``--out``). ``make_inputs`` / ``stage_argv`` also serve
tests/test_ddp.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from pocketgpt.cli import main as cli_main
from pocketgpt.checkpoint import save_model

ENV = {"OMP_NUM_THREADS": "1", "CI": "1", "PYTHONUNBUFFERED": "1"}  # tiny models: one thread, deterministic
TIMING = {"elapsed_s", "tok_per_s", "mfu"}  # the only fields allowed to differ between two runs
CHARS = "abcdefghij ABCDEFGHIJ!.?0123456789+="


def make_inputs(d: Path, tie: bool = True) -> dict:
    """A tiny random GPT checkpoint (char tokenizer with the chat tokens), conversations from two sources of very
    different lengths (arithmetic and chat), and preference pairs (chosen ends in '!', rejected in '.')."""
    from pocketgpt import GPT, GPTConfig
    from pocketgpt.tokenizer import Tokenizer

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train("char", [CHARS])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32,
                          tie_embeddings=tie))
    save_model(model, d / "init")
    tok.save(d / "init" / "tokenizer")
    rng = random.Random(0)

    def words(k):
        return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5))) for _ in range(k))

    def msgs(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    with open(d / "convs.jsonl", "w") as f:
        for i in range(40):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            conv = msgs(f"{a}+{b}=", str(a + b)) if i % 2 else msgs(words(4), words(5))
            f.write(json.dumps({"messages": conv}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": [{"role": "user", "content": words(2)}],
                                "chosen": words(2) + "!", "rejected": words(2) + ".", }) + "\n")
    return {"init": d / "init", "convs": d / "convs.jsonl", "pairs": d / "pairs.jsonl"}


def stage_argv(stage: str, inp: dict, **train) -> list:
    """``pocketgpt STAGE`` on the tiny inputs, fp32 on the CPU, a log line per step, evaluations and checkpoints
    along the way; ``train`` overrides [train] fields."""
    data = {"sft": inp["convs"], "rm": inp["pairs"], "dpo": inp["pairs"]}[stage]
    opts = {**dict(max_steps=16, batch_size=4, eval_interval=8, ckpt_interval=2, lr=3e-3, warmup_steps=2,
                   log_interval=1, dtype="fp32", device="cpu", progress="false"), **train}
    return [stage, "--init", inp["init"], "--data", data, f"--{stage}.val_fraction", 0.2,
            *[x for k, v in opts.items() for x in (f"--{k}", v)]]


def read_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{p.name}:{k}": v for p in sorted(ckpt.glob("*.safetensors")) if p.name != "optimizer.safetensors"
            for k, v in load_file(str(p)).items()}


def check_exact_resume(argv: list, run_dir: Path, kill_after: int = 4, timeout: float = 180) -> list[dict]:
    """Run ``pocketgpt ARGV --out run_dir/straight`` uninterrupted (in this process); run it again in a child process
    into ``run_dir/killed``, SIGKILL it
    as soon as it has a checkpoint at step >= ``kill_after`` (before its last step), rerun the same command, and
    assert both runs logged the same records (timing fields aside) and ended with the same weights, bitwise.
    Returns the records."""
    argv = [str(a) for a in argv]
    straight, killed = run_dir / "straight", run_dir / "killed"
    assert cli_main([*argv, "--out", str(straight)]) == 0  # in this process: one interpreter start-up less
    want = read_records(straight)
    last = max(r["step"] for r in want)
    assert kill_after < last, f"kill_after={kill_after} leaves no step to kill before the end ({last})"

    proc = subprocess.Popen([sys.executable, "-m", "pocketgpt", *argv, "--out", str(killed)],
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / "ckpt" / "trainer_state.json"
    killed_at, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state.read_text())["step"]  # written atomically (a renamed directory)
        except (OSError, ValueError, KeyError):
            step = 0
        if kill_after <= step < last:
            proc.send_signal(signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read()}"
    assert proc.returncode == -signal.SIGKILL

    p = run_cli(*argv, "--out", killed, env=ENV, timeout=timeout)  # the same command resumes
    assert f"at step {killed_at}" in p.stderr and "resuming" in p.stderr
    got = read_records(killed)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    assert strip(got) == strip(want)  # every step once, every value bitwise (JSON floats round-trip)
    wa, wb = weights(straight / "ckpt"), weights(killed / "ckpt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return want


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"), tie=False)


# stage -> argv (without --out) of a run on the tiny inputs
STAGES = {stage: (lambda inp, stage=stage: stage_argv(stage, inp)) for stage in ("sft", "rm", "dpo")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_exact_resume_after_sigkill(stage, inputs, tmp_path):
    records = check_exact_resume(STAGES[stage](inputs), tmp_path)
    assert any("val_loss" in r for r in records) and any("loss" in r for r in records)
