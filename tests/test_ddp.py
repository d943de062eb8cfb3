"""Every stage under torchrun (gloo on the CPU): 2 processes x grad_accum 2 log the same training curve as 1 process
x grad_accum 4 (the same global batch), with tied and untied embeddings, and so does SFT under FSDP; each rank's stage
tensors come back to it on resume; a parameter the loss never uses is a one-line error on every rank, not DDP's
RuntimeError."""

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from pocketgpt.cli import main as cli_main
from test_resume import ENV, TIMING, make_inputs, read_records, stage_argv


def torchrun(*argv, timeout=240):
    env = {**os.environ, **ENV}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return {tie: make_inputs(tmp_path_factory.mktemp(f"tie{tie}"), tie=tie) for tie in (True, False)}


@pytest.mark.parametrize("stage, tie, parallel", [("sft", True, "ddp"), ("rm", False, "ddp"), ("dpo", False, "ddp"),
                                                  ("sft", True, "fsdp")])
def test_two_processes_equal_one_with_double_accumulation(stage, tie, parallel, inputs, tmp_path, capsys):
    short = dict(max_steps=3, batch_size=2, eval_interval=0, ckpt_interval=0)  # one evaluation, at the end
    argv = stage_argv(stage, inputs[tie], grad_accum=2, parallel=parallel, **short)
    p = torchrun("-m", "pocketgpt", *argv, "--out", tmp_path / "ddp")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(str(tmp_path / "ddp" / "ckpt")) == 1  # rank 0 reports, once
    argv = stage_argv(stage, inputs[tie], grad_accum=4, **short)
    assert cli_main([str(a) for a in argv] + ["--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    ddp, one = (read_records(tmp_path / d) for d in ("ddp", "one"))
    assert [sorted(r) for r in ddp] == [sorted(r) for r in one] and len([r for r in one if "loss" in r]) == 3
    for a, b in zip(ddp, one):  # losses, the stage's metrics (averaged over ranks), grad norm, held-out metrics
        assert {k: v for k, v in a.items() if k not in TIMING} == pytest.approx(
            {k: v for k, v in b.items() if k not in TIMING}, rel=1e-4, abs=1e-6), (a, b)


TOY = """
import sys, torch, torch.nn as nn
from pathlib import Path
from safetensors.torch import load_file
from pocketgpt.errors import UserError
from pocketgpt.train.trainer import Trainer, TrainConfig, world_info

class Model(nn.Module):
    def __init__(self, unused):
        super().__init__()
        self.used = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1) if unused else None  # a head the loss never reads
    def forward(self, x):
        return self.used(x).pow(2).mean()

class Stage:
    name = "toy"
    def __init__(self):
        self.t = torch.full((2,), float(world_info()[0]))  # per-rank tensor state
    def get_batch(self, step, micro): return torch.ones(2, 4)
    def loss(self, model, x): return model(x), {}
    def evaluate(self, model): return {}
    def state_dict(self): return {}
    def load_state_dict(self, state): pass
    def state_tensors(self): return {"t": self.t}
    def load_state_tensors(self, d): self.t = d["t"] + 10

run = Path(sys.argv[1])
cfg = lambda steps: TrainConfig(max_steps=steps, batch_size=2, grad_accum=2, warmup_steps=0, device="cpu",
                                dtype="fp32", progress=False)
Trainer(Model(False), Stage(), cfg(2), run / "a").fit()
stage = Stage()
Trainer(Model(False), stage, cfg(3), run / "a").fit()  # resumes: each rank gets its own tensors back
print(f"rank {world_info()[0]} resumed with {stage.t.tolist()}", flush=True)
try:
    Trainer(Model(True), Stage(), cfg(3), run / "b").fit()
except UserError as e:
    sys.stderr.write(f"error: {e}\\n")  # one write: the two ranks' lines cannot interleave
    sys.exit(2)
"""


def test_stage_tensors_per_rank_and_unused_parameters_are_one_line_errors(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    p = torchrun(script, tmp_path)
    saved = load_file(str(tmp_path / "a" / "ckpt" / "stage.safetensors"))
    assert {k: v.tolist() for k, v in saved.items()} == {"rank0.t": [10.0, 10.0], "rank1.t": [11.0, 11.0]}
    assert "rank 0 resumed with [10.0, 10.0]" in p.stdout and "rank 1 resumed with [11.0, 11.0]" in p.stdout
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 2, p.stderr  # one line from each rank (then torchrun's own report)
    assert "never uses 2 trainable parameter(s) (unused.weight, unused.bias)" in lines[0]
    assert "requires_grad=False" in lines[0] and "ddp_find_unused" in lines[0]
    assert "RuntimeError" not in p.stderr and "finished reduction" not in p.stderr
