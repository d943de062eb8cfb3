"""The command line as a user meets it: unknown options, abbreviations, file permissions of what it writes."""

import os
import stat

import pytest
import torch

from conftest import tiny_config
from pocketgpt import GPT
from pocketgpt.checkpoint import save_model
from pocketgpt.cli import main


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, hint", [
    (["pretrain", "--config", "tiny", "--max_stepz", "3"], "did you mean '--max_steps'?"),
    (["pretrain", "--config", "tiny", "--learning_rate", "1e-3"], "did you mean '--lr'?"),
    (["pretrain", "--config", "tiny", "--max_step=3"], "did you mean '--max_steps'?"),  # no abbreviation
    (["sample", "--ckpt", "x", "--temprature", "1"], "did you mean '--temperature'?"),
    (["tokenizer", "train", "--vocab-sise", "300", "--out", "x"], "did you mean '--vocab-size'?"),
])
def test_unknown_flags_get_did_you_mean_and_no_abbreviations(argv, hint, capsys):
    err = _error(argv, capsys)
    assert err.startswith(f"pocketgpt {argv[0]}: error: --") and hint in err


def test_toml_keys_share_the_aliases(tmp_path):
    from pocketgpt.config import load_config
    from pocketgpt.errors import UserError
    from pocketgpt.train.trainer import TrainConfig

    (tmp_path / "c.toml").write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match=r"c.toml:2: \[train\] unknown key 'learning_rate' \(did you mean 'lr'\?\)"):
        load_config(tmp_path / "c.toml", sections={"train": TrainConfig})


def test_written_files_have_ordinary_permissions(tmp_path):
    from pocketgpt.checkpoint import export_hf

    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config())
        save_model(model, tmp_path / "ckpt")
        export_hf(model, tmp_path / "hf")
    finally:
        os.umask(old)
    for d in ("ckpt", "hf"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o755
        for f in (tmp_path / d).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
