"""A run directory resumes only the run that wrote it: another model, data set, seed or batch size is one line naming
--restart / --out (for every stage: the Trainer checks), while how long / how often / where may change."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from pocketgpt import GPT, UserError
from pocketgpt.cli import main as cli_main
from pocketgpt.train.trainer import Trainer
from test_trainer import CopyStage, cfg


def refusal(trainer) -> str:
    with pytest.raises(UserError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "--restart" in msg and "--out" in msg and "\n" not in msg
    return msg


def test_trainer_refuses_another_run_and_resumes_a_longer_one(tmp_path, capsys):
    run = tmp_path / "run"
    torch.manual_seed(0)
    Trainer(GPT(tiny_config()), CopyStage(), cfg(max_steps=3), run).fit()
    saved = (run / "ckpt" / "model.safetensors").read_bytes()

    msg = refusal(Trainer(GPT(tiny_config(vocab_size=50)), CopyStage(), cfg(max_steps=3), run))
    assert "model.vocab_size 97 → 50" in msg and str(run) in msg
    assert "train.seed 1337 → 7" in refusal(Trainer(GPT(tiny_config()), CopyStage(), cfg(max_steps=5, seed=7), run))
    assert "train.batch_size 4 → 2" in refusal(Trainer(GPT(tiny_config()), CopyStage(), cfg(batch_size=2), run))
    other = CopyStage()
    other.fingerprint = "another data set"
    assert "stage.fingerprint None → 'another data set'" in refusal(Trainer(GPT(tiny_config()), other, cfg(), run))
    assert (run / "ckpt" / "model.safetensors").read_bytes() == saved  # nothing was loaded or written

    # how long, how often, where: a resume
    longer = cfg(max_steps=5, eval_interval=0, ckpt_interval=5, log_interval=2, optimizer_impl="foreach")
    capsys.readouterr()
    assert Trainer(GPT(tiny_config()), CopyStage(), longer, run).fit()["step"] == 5
    assert "at step 3" in capsys.readouterr().err


def char_data(d, vocab: int, fingerprint: str):
    """Prepared-looking shards of ``vocab`` ids (meta.json as 'pocketgpt prepare' writes it, in short)."""
    ids = (np.arange(4000) * 7 % vocab).astype(np.uint16)
    d.mkdir(parents=True)
    ids[:3600].tofile(d / "train.bin")
    ids[3600:].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab, "fingerprint": fingerprint,
                                             "counts": {"train": 3600, "val": 400}}))
    return d


def test_pretrain_tiny_on_another_data_set_is_one_line(tmp_path, monkeypatch, capsys):
    """The issue's case: `pretrain --config tiny` twice (runs/tiny) on data of another vocabulary."""
    monkeypatch.chdir(tmp_path)
    a, b = char_data(tmp_path / "a", 172, "fp-a"), char_data(tmp_path / "b", 786, "fp-b")
    quick = ["--max_steps", "2", "--eval_interval", "0", "--batch_size", "2", "--n_layer", "1", "--progress", "false",
             "--device", "cpu"]
    assert cli_main(["pretrain", "--config", "tiny", "--data.dir", str(a), *quick]) == 0
    capsys.readouterr()
    assert cli_main(["pretrain", "--config", "tiny", "--data.dir", str(b), *quick]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the parameter count)
    assert err.startswith("pocketgpt pretrain: error: runs/tiny holds another run") and "--restart" in err
    assert "--out" in err
    assert f"data.dir '{a}' → '{b}'" in err and "model.vocab_size 172 → 786" in err

    (a / "meta.json").write_text((a / "meta.json").read_text().replace("fp-a", "fp-a2"))  # prepared again
    assert cli_main(["pretrain", "--config", "tiny", "--data.dir", str(a), *quick]) == 2
    assert "stage.fingerprint 'fp-a' → 'fp-a2'" in capsys.readouterr().err
    assert cli_main(["pretrain", "--config", "tiny", "--data.dir", str(b), *quick, "--restart"]) == 0


def test_sft_with_other_data_is_refused(tmp_path, capsys):
    """The check is the Trainer's: another stage refuses another data set the same way."""
    from test_resume import make_inputs, stage_argv

    inp = make_inputs(tmp_path / "in")
    argv = [str(x) for x in stage_argv("sft", inp, max_steps=2, eval_interval=0, ckpt_interval=0)]
    out = ["--out", str(tmp_path / "sft")]
    assert cli_main([*argv, *out]) == 0
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(inp["convs"].read_text().splitlines(keepends=True)[:30]))
    capsys.readouterr()
    assert cli_main([*[str(fewer) if x == str(inp["convs"]) else x for x in argv], *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the data counts)
    assert err.startswith("pocketgpt sft: error:") and "holds another run (sft.data" in err and "--restart" in err
    assert cli_main([*argv, *out, "--max_steps", "3"]) == 0  # the same run, longer: resumes
    assert "resuming sft" in capsys.readouterr().err
