"""FSDP2 (``train.parallel = "fsdp"``) under torchrun on gloo: 2 processes x grad_accum 2 log the same pretraining
curve as DDP at the same global batch, a run stopped and resumed under FSDP continues that curve (full optimizer
state), and its checkpoints are plain full state dicts that load in one process without FSDP. SFT under FSDP is in
tests/test_ddp.py."""

import pytest
import torch
from safetensors.torch import load_file

from pocketgpt.checkpoint import load_model
from pocketgpt.cli import main as cli_main
from test_ddp import torchrun
from test_pretrain import char_data, write_config  # noqa: F401 - the fixture
from test_resume import TIMING, read_records


def test_fsdp_equals_ddp_resumes_and_its_checkpoint_loads_in_one_process(tmp_path, char_data):  # noqa: F811
    # a constant schedule after warm-up: stopping at step 3 (max_steps 3) and going on to 6 is the same schedule
    cfg = write_config(tmp_path / "c.toml", char_data, max_steps=6, batch_size=4, grad_accum=2, warmup_steps=2,
                       schedule="constant", ckpt_interval=0, eval_batches=2)
    pretrain = ("-m", "pocketgpt", "pretrain", "--config", cfg)
    p = torchrun(*pretrain, "--out", tmp_path / "ddp")
    assert p.returncode == 0, p.stdout + p.stderr
    p = torchrun(*pretrain, "--parallel", "fsdp", "--max_steps", 3, "--out", tmp_path / "fsdp")
    assert p.returncode == 0, p.stdout + p.stderr
    p = torchrun(*pretrain, "--parallel", "fsdp", "--out", tmp_path / "fsdp")  # resumes at step 3
    assert p.returncode == 0 and "resuming pretrain" in p.stderr and "at step 3" in p.stderr, p.stdout + p.stderr

    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    ddp = strip(read_records(tmp_path / "ddp"))
    fsdp = [r for r in strip(read_records(tmp_path / "fsdp")) if not (r["step"] == 3 and "val_loss" in r)]
    assert [sorted(r) for r in fsdp] == [sorted(r) for r in ddp] and len([r for r in ddp if "loss" in r]) == 6
    for a, b in zip(fsdp, ddp):  # losses, grad norms (clipping at 1.0 acts on steps 1-2), the final evaluation
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (a, b)
    assert max(r.get("grad_norm", 0) for r in ddp) > 1.0

    # full tensors, the same names as DDP's; the optimizer state too (moments of every parameter)
    for name in ("model", "optimizer"):
        a, b = (load_file(str(tmp_path / run / "ckpt" / f"{name}.safetensors")) for run in ("fsdp", "ddp"))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    x = torch.randint(0, 20, (2, 16))
    for d in ("ckpt", "best"):
        got, want = (load_model(tmp_path / run / d)(x)[0] for run in ("fsdp", "ddp"))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rl_stages_refuse_fsdp_in_one_line(tmp_path, capsys):
    rc = cli_main(["grpo", "--init", str(tmp_path / "none"), "--task", "arithmetic", "--parallel", "fsdp",
                   "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "grpo: train.parallel = fsdp is not supported" in err, err
