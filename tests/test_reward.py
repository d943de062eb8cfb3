"""Reward model: learns a preference it can see, saves/loads as a checkpoint, scores files, rejects bad pairs."""

import json
import random

import pytest
import torch

from pocketgpt import GPT, GPTConfig, UserError
from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.cli import main as cli_main

LETTERS = "abcdefghij"


def make_init_checkpoint(path, block_size=64):
    """A tiny random GPT + char tokenizer saved like an SFT checkpoint (config.json, model.safetensors, tokenizer/)."""
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("char", [LETTERS + " !.?" + LETTERS.upper()])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    save_model(model, path)
    tok.save(path / "tokenizer")
    return path


def write_synthetic_pairs(path, n, seed=0):
    """Chosen replies end with '!', rejected ones with '.': a property only the ending reveals."""
    rng = random.Random(seed)

    def words(k):
        return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5))) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": words(3)}],
                                "chosen": words(rng.randint(2, 4)) + "!",
                                "rejected": words(rng.randint(2, 4)) + "."}) + "\n")
    return path


def rm_config(**train):
    from pocketgpt.config import load_config
    from pocketgpt.train.reward import SECTIONS

    ov = {"train.max_steps": 25, "train.lr": 3e-3, "train.min_lr": 3e-4, "train.warmup_steps": 3,
          "train.eval_interval": 0, "train.ckpt_interval": 0, "train.dtype": "fp32", "train.progress": False,
          "train.batch_size": 8}
    ov.update({f"train.{k}": v for k, v in train.items()})
    return load_config("rm-tiny", ov, SECTIONS)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    from pocketgpt.train.reward import train_reward_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("rm")
    init = make_init_checkpoint(d / "sft")
    train = write_synthetic_pairs(d / "train.jsonl", 160, seed=0)
    val = write_synthetic_pairs(d / "val.jsonl", 40, seed=1)
    result = train_reward_model(init, train, d / "run", rm_config(), val_data=val, resume=False)
    torch.set_num_threads(old)
    return d, result


def test_rm_learns_synthetic_preference(trained_rm):
    d, result = trained_rm
    assert result["eval_accuracy"] >= 0.9, result
    records = [json.loads(l) for l in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]  # the Bradley–Terry loss falls
    assert any("eval_accuracy" in r and "eval_margin" in r for r in records)  # TRL's names
    assert all("accuracy" in r and "margin" in r for r in records if "loss" in r)
    assert (d / "run" / "accuracy.png").exists() and (d / "run" / "margin.png").exists()


def test_rm_checkpoint_loads_and_scores_like_the_trained_model(trained_rm, one_thread):
    from pocketgpt.tokenizer import load_tokenizer_for
    from pocketgpt.train.reward import encode_reply, load_reward_model

    d, _ = trained_rm
    ckpt = d / "run" / "ckpt"
    meta = json.loads((ckpt / "reward_model.json").read_text())
    assert meta["kind"] == "reward_model" and meta["val_accuracy"] >= 0.9
    load_model(ckpt)  # the backbone is an ordinary GPT checkpoint
    rm = load_reward_model(ckpt)
    tok = load_tokenizer_for(ckpt)
    prompt = [{"role": "user", "content": "abc de"}]
    good, bad = (encode_reply(prompt, r, tok, 64) for r in ("hi there!", "hi there."))
    s_good, s_bad = rm.score_ids([good, bad], tok.pad_id)
    assert s_good > s_bad
    # batched scoring with padding reads each row at its own last token
    alone = rm.score_ids([bad], tok.pad_id)[0]
    assert alone == pytest.approx(s_bad, abs=1e-4)


def run(capsys, *args):
    """The ``pocketgpt`` CLI in this process (same parser and error handling, no interpreter start-up)."""
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_rm_score_cli_pairs_and_conversations(trained_rm, tmp_path, capsys, one_thread):
    d, _ = trained_rm
    rc, out, _ = run(capsys, "rm", "score", "--ckpt", d / "run", "--data", d / "val.jsonl")
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 41 and "chosen" in lines[0] and "rejected" in lines[0]
    acc = float(lines[-1].split()[2])
    assert acc >= 0.9
    conv = tmp_path / "conv.jsonl"
    conv.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "abc"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for reply in ("good one!", "good one.")))
    rc, out, _ = run(capsys, "rm", "score", "--ckpt", d / "run" / "ckpt", "--data", conv, "--json")
    rows = [json.loads(l) for l in out.splitlines()]
    assert [r["where"] for r in rows] == [f"{conv}:1", f"{conv}:2"]
    assert rows[0]["score"] > rows[1]["score"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "just text", "chosen": "a", "rejected": "b"}, "'prompt' must be a list of messages"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "role"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a"}, "missing 'rejected'"),
])
def test_bad_pairs_name_file_and_line(tmp_path, record, message):
    from pocketgpt.records import read_pairs

    path = tmp_path / "pairs.jsonl"
    good = {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError) as e:
        read_pairs(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_rm_cli_bad_input_is_one_line(tmp_path, capsys):
    init = make_init_checkpoint(tmp_path / "sft")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}\nnot json\n')
    rc, _, err = run(capsys, "rm", "--init", init, "--data", bad, "--out", tmp_path / "run")
    assert rc == 2
    assert err.strip().count("\n") == 0 and f"{bad}:2:" in err and err.startswith("pocketgpt rm: error:")
    assert not (tmp_path / "run" / "ckpt").exists()
    # a plain GPT checkpoint is not a reward model
    rc, _, err = run(capsys, "rm", "score", "--ckpt", init, "--data", bad)
    assert rc == 2 and "not a reward model" in err
