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



def test_options_come_from_the_config_models_once_with_their_aliases(tmp_path, capsys):
    """Each config field is one option (``--beta`` is ``--dpo.beta``; ``--policy`` is ``--init``; grpo's ``--n`` and
    ``--group-size`` are ``samples_per_prompt``), and a bad value names the flag the user typed."""
    from pocketgpt.cli import _load, build_parser

    args = build_parser(only="dpo").parse_args(["dpo", "--beta", "0.3", "--data", "a.jsonl", "b.jsonl"])
    assert _load(args)[0]["dpo"].beta == 0.3
    args = build_parser(only="dpo").parse_args(["dpo", "--dpo.beta", "0.2", "--loss", "ipo"])
    assert (_load(args)[0]["dpo"].beta, _load(args)[0]["dpo"].loss) == (0.2, "ipo")
    for flag in ("--n", "--group-size", "--samples_per_prompt", "--grpo.samples_per_prompt"):
        args = build_parser(only="grpo").parse_args(["grpo", "--policy", "ckpt", flag, "4"])
        cfg = _load(args)[0]["grpo"]
        assert (cfg.init, cfg.samples_per_prompt) == ("ckpt", 4)
    assert "'--init'" in _error(["dpo", "--inti", "x"], capsys)
    assert "--n: must be at least 2, got 1" in _error(["grpo", "--init", "x", "--n", "1"], capsys)
    assert "--beta: must be > 0" in _error(["dpo", "--init", "x", "--data", "prefs", "--beta", "0"], capsys)
    assert "--loss: must be one of 'sigmoid' or 'ipo', got 'hinge'" in _error(["dpo", "--loss", "hinge"], capsys)
    assert "--max_steps: expected int" in _error(["sft", "--max_steps", "ten"], capsys)
    (tmp_path / "c.toml").write_text("[dpo]\nloss = 'ipo'\nlabel_smoothing = 0.1\n")
    err = _error(["dpo", "--config", str(tmp_path / "c.toml")], capsys)
    assert f"c.toml:3: [dpo] label_smoothing: applies to the sigmoid loss only" in err

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
