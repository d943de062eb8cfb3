"""`pocketgpt pretrain` / `pocketgpt eval` as a user runs them: exact resume after SIGKILL, DDP == grad accumulation,
the loss falls on Tiny Shakespeare, clear one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli
from pocketgpt.cli import main as cli_main
from test_resume import check_exact_resume

ONE_THREAD = {"OMP_NUM_THREADS": "1", "CI": "1"}  # small models: 1 thread is fastest and deterministic


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """Character-level shards of the bundled Tiny Shakespeare (a slice: enough for short runs)."""
    from pocketgpt.data import builtin_path

    text = builtin_path("shakespeare").read_text(encoding="utf-8")[:300_000]
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.array([lut[c] for c in text], dtype=np.uint16)
    d = tmp_path_factory.mktemp("shakespeare-char")
    n = int(len(ids) * 0.9)
    ids[:n].tofile(d / "train.bin")
    ids[n:].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": len(chars),
                                             "counts": {"train": n, "val": len(ids) - n}}))
    return d


def write_config(path, data_dir, **train):
    t = dict(max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, dtype="fp32", device="cpu",
             eval_interval=0, eval_batches=4, ckpt_interval=5, log_interval=1)
    t.update(train)
    lines = ["[model]", "block_size = 32", "n_layer = 2", "n_head = 2", "n_embd = 32", "dropout = 0.1", "",
             "[train]"] + [f"{k} = {json.dumps(v)}" for k, v in t.items()] + ["", "[data]", f'dir = "{data_dir}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def train_losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def weights(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, char_data):
    """30 uninterrupted steps (checkpoint every 5, one evaluation at the end)."""
    d = tmp_path_factory.mktemp("straight")
    cfg = write_config(d / "c.toml", char_data)
    p = run_cli("pretrain", "--config", cfg, "--out", d / "run", env=ONE_THREAD)
    return cfg, d / "run", p


def test_loss_falls_and_eval_reports_perplexity(straight, char_data):
    cfg, run, p = straight
    losses = train_losses(run)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r][-1]
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    assert val["step"] == 30 and val["val_loss"] < np.log(vocab) - 0.5
    assert val["val_ppl"] == pytest.approx(np.exp(val["val_loss"]))
    assert "val_loss" in p.stdout and "val_ppl" in p.stdout and str(run / "ckpt") in p.stdout
    assert (run / "loss.png").exists() and (run / "run_config.toml").exists() and (run / "best").is_dir()
    e = run_cli("eval", "--ckpt", run / "ckpt", "--data", char_data, "--max_batches", "4", "--dtype", "fp32",
                env=ONE_THREAD)
    words = e.stdout.split()  # "val loss X  perplexity Y"
    loss, ppl = float(words[2]), float(words[4])
    assert words[3] == "perplexity" and ppl == pytest.approx(np.exp(loss), rel=1e-3)
    assert loss == pytest.approx(val["val_loss"], abs=1e-4)  # the same windows as the run's evaluation


def test_exact_resume_after_sigkill(tmp_path, straight):
    records = check_exact_resume(["pretrain", "--config", straight[0]], tmp_path, kill_after=15, timeout=120)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))  # every step, once


def test_muon_pretrain_learns_and_resumes_exactly_after_sigkill(tmp_path, char_data):
    from test_resume import check_exact_resume

    cfg = write_config(tmp_path / "c.toml", char_data, optimizer="muon", max_steps=20, eval_interval=10)
    records = check_exact_resume(["pretrain", "--config", cfg], tmp_path, kill_after=10)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5


def test_bits_per_byte_beside_every_val_loss(tmp_path, capsys):
    from pocketgpt.data import builtin_path, prepare
    from pocketgpt.tokenizer import Tokenizer
    from pocketgpt.train.pretrain import bytes_per_token

    tok = Tokenizer.train("char", ["ab水"])
    assert bytes_per_token(tok, tok.encode("ab水水") + [tok.eos_id]) == (1 + 1 + 3 + 3) / 5  # specials: no bytes
    src = tmp_path / "in.txt"
    src.write_text(builtin_path("shakespeare").read_text(encoding="utf-8")[:40_000] + "水浒传" * 300)
    meta = prepare([src], tmp_path / "data", kind="char", split="tail", raw=True, verbose=False)
    val = np.fromfile(tmp_path / "data" / "val.bin", dtype=meta["dtype"])
    per_token = len(Tokenizer.load(tmp_path / "data" / "tokenizer").decode(val.tolist()).encode()) / len(val)
    assert per_token > 1.2  # the Chinese tail is 3 bytes a character
    cfg = write_config(tmp_path / "c.toml", tmp_path / "data", max_steps=4, ckpt_interval=0, eval_interval=2)
    assert cli_main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / (np.log(2) * per_token), rel=1e-9)
    assert f"val_bpb {evals[-1]['val_bpb']:.4f}" in capsys.readouterr().out
    assert cli_main(["eval", "--ckpt", str(tmp_path / "run" / "ckpt"), "--data", str(tmp_path / "data"),
                     "--dtype", "fp32"]) == 0
    words = capsys.readouterr().out.split()  # "val loss X  perplexity Y  bits/byte Z"
    assert words[5] == "bits/byte" and float(words[6]) == pytest.approx(float(words[2]) / (np.log(2) * per_token),
                                                                        abs=2e-4)


def test_ddp_two_processes_equal_one_with_double_accumulation(tmp_path, char_data):
    cfg = write_config(tmp_path / "c.toml", char_data, max_steps=4, ckpt_interval=0)
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pocketgpt", "pretrain", "--config", str(cfg), "--out", str(tmp_path / "ddp"),
                        "--dropout", "0", "--grad_accum", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    run_cli("pretrain", "--config", cfg, "--out", tmp_path / "single", "--dropout", "0", "--grad_accum", "2",
            env=ONE_THREAD)
    wa, wb = weights(tmp_path / "ddp" / "ckpt"), weights(tmp_path / "single" / "ckpt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    # and it moved: the weights are not the initial ones
    la, lb = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert la[4] == pytest.approx(lb[4], abs=1e-5)


def one_error_line(capsys, *argv):
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_config_key_missing_data_block_size_are_one_line(tmp_path, char_data, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[train]\nmax_steps = 3\nwarmpu_steps = 1\n\n[data]\ndir = "{char_data}"\n')
    err = one_error_line(capsys, "pretrain", "--config", bad, "--out", tmp_path / "r")
    assert f"{bad}:3" in err and "warmpu_steps" in err and "did you mean 'warmup_steps'" in err

    cfg = write_config(tmp_path / "c.toml", char_data)
    err = one_error_line(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "r", "--data.dir", tmp_path / "nope")
    assert "nope" in err and "not found" in err and "prepare" in err

    err = one_error_line(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "r", "--data.block_size", "64")
    assert "block_size (64)" in err and "context" in err and "(32)" in err

    err = one_error_line(capsys, "pretrain", "--config", "no-such-preset", "--out", tmp_path / "r")
    assert "no-such-preset" in err

    err = one_error_line(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "r", "--train.lr", "fast")
    assert "--train.lr" in err and "float" in err
    assert not (tmp_path / "r" / "ckpt").exists()
