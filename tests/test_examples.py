"""The runnable examples (examples/*.py) in their quick modes, run as a user would: each in its own process.

The three scripts start together (each single-threaded) so the module costs about the slowest one, not the sum;
each test then waits for its own script and checks what it produced against the data, not against fixed numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

EXAMPLES = ROOT / "examples"
TIMEOUT = 600  # generous: other test modules may share the CPU


class Job:
    def __init__(self, name: str, args: list[str], out: Path, log_dir: Path):
        self.name, self.out = name, out
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CI="1", MPLBACKEND="Agg")
        self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.stdout_path, "w") as so, open(self.stderr_path, "w") as se:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=so, stderr=se, text=True)

    def wait(self, expect_rc: int = 0) -> str:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name}: did not finish in {TIMEOUT}s")
        stdout, stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
        assert rc == expect_rc, f"{self.name}: exit code {rc}, expected {expect_rc}\n{stdout}\n{stderr}"
        self.stderr = stderr
        return stdout


SPECS = {  # job name -> (command line, the test that checks it)
    "word_gpt": (["examples/word_gpt.py", "--quick", "--device", "cpu"],
                 "test_word_gpt_reproduces_training_sentences_greedily"),
    "shuihu_pos": (["examples/shuihu_pos.py", "--quick", "--device", "cpu"],
                   "test_shuihu_pos_compares_learned_and_rope"),
    "digits_mlp": (["examples/digits_mlp.py", "--quick", "--device", "cpu"], "test_digits_mlp_accuracy"),
    "digits_bad": (["examples/digits_mlp.py", "--epochs", "0"], "test_example_bad_option_is_one_line_error"),
}


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Start, at once, the scripts of every selected test of this module."""
    base = tmp_path_factory.mktemp("examples")
    here = Path(__file__).resolve()
    selected = {item.originalname for item in request.session.items if Path(str(item.fspath)).resolve() == here}
    started = {name: Job(name, [*args, "--out", str(base / name)], base / name, base)
               for name, (args, test) in SPECS.items() if test in selected}
    yield started
    for job in started.values():  # a failed test must not leave a script running
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def test_word_gpt_reproduces_training_sentences_greedily(jobs):
    job = jobs["word_gpt"]
    stdout = job.wait()
    corpus = {line.strip() for line in (EXAMPLES / "sentences.txt").read_text().splitlines() if line.strip()}
    results = json.loads((job.out / "results.json").read_text())
    samples = results["samples"]
    assert len(samples) >= 3
    for s in samples:
        assert s["text"].startswith(s["prompt"]) and s["continuation"].strip()  # it generated something
        assert (s["text"].strip() in corpus) == s["in_corpus"]  # the script's own check agrees with ours
        assert s["text"] in stdout  # and it printed the continuation
    reproduced = [s["text"].strip() for s in samples if s["text"].strip() in corpus]
    assert len(reproduced) > len(samples) // 2, f"greedy continuations are not corpus sentences: {samples}"
    # trained through the library: a loadable checkpoint with its tokenizer, metrics and the loss plot
    run = job.out / "run"
    assert (run / "ckpt" / "model.safetensors").is_file() and (run / "ckpt" / "tokenizer").is_dir()
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.25 * losses[0]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shuihu_pos_compares_learned_and_rope(jobs):
    job = jobs["shuihu_pos"]
    stdout = job.wait()
    summary = json.loads((job.out / "summary.json").read_text())
    runs = summary["runs"]
    assert set(runs) == {"learned", "rope"}
    assert runs["learned"]["pos"] == "learned" and runs["rope"]["pos"] == "rope"
    assert runs["learned"]["steps"] == runs["rope"]["steps"]  # the same budget
    assert runs["learned"]["params"] > 0 and runs["rope"]["params"] > 0
    for name, r in runs.items():
        assert math.isfinite(r["val_loss"]), name
        curve = r["val_curve"]["val_loss"]
        assert r["val_loss"] < curve[0] - 0.5, f"{name}: validation loss did not fall: {curve}"
        # the figure comes from this run's own metrics
        evals = [json.loads(l) for l in (job.out / name / "metrics.jsonl").read_text().splitlines()]
        assert [e["val_loss"] for e in evals if "val_loss" in e][-1] == pytest.approx(r["val_loss"])
        assert f"{r['val_loss']:.4f}" in stdout  # printed in the table
        assert len(summary["samples"][name]) >= 1 and all(s.strip() for s in summary["samples"][name])
    # both runs used the same shards and the same tokenizer
    cfgs = [(job.out / n / "run_config.toml").read_text() for n in ("learned", "rope")]
    assert 'pos = "learned"' in cfgs[0] and 'pos = "rope"' in cfgs[1]
    assert cfgs[0].replace('pos = "learned"', 'pos = "rope"') == cfgs[1]  # they differ only in pos
    png = job.out / summary["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_digits_mlp_accuracy(jobs):
    job = jobs["digits_mlp"]
    stdout = job.wait()
    results = json.loads((job.out / "results.json").read_text())
    assert results["test_accuracy"] > 0.9, results
    assert f"test accuracy {100 * results['test_accuracy']:.2f}%" in stdout
    history = results["history"]
    assert len(history) == results["epochs"] and history[-1]["train_loss"] < history[0]["train_loss"]
    assert (job.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (job.out / "model" / "model.safetensors").is_file()


def test_example_bad_option_is_one_line_error(jobs):
    job = jobs["digits_bad"]
    job.wait(expect_rc=2)
    lines = job.stderr.strip().splitlines()
    assert len(lines) == 1 and "--epochs" in lines[0] and "Traceback" not in job.stderr
