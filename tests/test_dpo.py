"""DPO: the loss behaves as the papers say, training on pairs with a learnable preference raises the held-out
implicit-reward accuracy above chance and widens the chosen-minus-rejected margin, runs resume, errors are clear."""

import json
import random

import pytest
import torch

from conftest import run_cli
from pocketgpt import GPT, GPTConfig
from pocketgpt.checkpoint import save_model
from pocketgpt.train.dpo import dpo_loss, pair_accuracy

VOWELS, CONSONANTS = "aeiou", "bcdfg"




def _make_ckpt(path):
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("char", ["say word: " + VOWELS + CONSONANTS + "xyz"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32))
    save_model(model, path)
    tok.save(path / "tokenizer")
    return path


def _make_pairs(path, n=160, seed=0):
    """The chosen reply is made of vowels, the rejected one of consonants: a property the policy can learn."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            word = "".join(rng.choice("xyz") for _ in range(3))
            chosen = "".join(rng.choice(VOWELS) for _ in range(rng.randint(3, 6)))
            rejected = "".join(rng.choice(CONSONANTS) for _ in range(rng.randint(3, 6)))
            rec = {"prompt": [{"role": "user", "content": f"say {word}"}], "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(rec) + "\n")
    return path


def _evals(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_loss_shapes():
    h = torch.linspace(-20, 20, 401)
    z = torch.zeros_like(h)
    sig, rc, rr = dpo_loss(h, z, z, z, beta=0.1)
    assert torch.all(sig[1:] <= sig[:-1])  # sigmoid DPO: always better to widen the margin
    torch.testing.assert_close(rc - rr, 0.1 * h)
    # conservative DPO (label smoothing eps): optimum at a finite margin log((1-eps)/eps)/beta
    smooth, _, _ = dpo_loss(h, z, z, z, beta=0.5, label_smoothing=0.1)
    best = h[smooth.argmin()]
    assert abs(float(best) - torch.log(torch.tensor(9.0)).item() / 0.5) < 0.15
    # IPO: squared loss with its minimum at margin 1/(2 beta)
    ipo, _, _ = dpo_loss(h, z, z, z, beta=0.25, loss_type="ipo")
    assert abs(float(h[ipo.argmin()]) - 2.0) < 0.15
    # ties count half: an untrained policy (policy == reference) is at chance, not at 0
    assert float(pair_accuracy(z, z)) == 0.5


def test_dpo_learns_preference_and_resumes(tmp_path, one_thread):
    from pocketgpt.train.dpo import DPOConfig, run_dpo
    from pocketgpt.train.trainer import TrainConfig

    ckpt = _make_ckpt(tmp_path / "init")
    pairs = _make_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    opts = DPOConfig(init=str(ckpt), data=[str(pairs)], beta=0.1, val_fraction=0.25)

    def train(steps):
        cfg = TrainConfig(max_steps=steps, batch_size=8, lr=3e-3, min_lr=3e-3, warmup_steps=0, schedule="constant",
                          weight_decay=0.0, dtype="fp32", eval_interval=10, ckpt_interval=20, log_interval=5,
                          progress=False)
        return run_dpo(opts, run, cfg, log=lambda s: None)

    train(20)
    cache = run / "ref_logprobs.safetensors"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    result = train(40)  # same run directory: resumes at step 20, reuses the cached reference log-probs
    assert cache.stat().st_mtime_ns == stamp
    evals = _evals(run)
    steps = [r["step"] for r in evals]
    assert steps == [0, 10, 20, 30, 40]  # one evaluation per step, none repeated by the resume
    start, end = evals[0], evals[-1]
    # policy == reference at step 0
    assert start["eval_rewards/accuracies"] == 0.5 and abs(start["eval_rewards/margins"]) < 1e-6
    assert end["eval_rewards/accuracies"] > 0.75, evals  # held-out implicit-reward accuracy well above chance
    assert end["eval_rewards/margins"] > 0.05
    logp_margin = lambda r: r["eval_logps/chosen"] - r["eval_logps/rejected"]
    assert logp_margin(end) > logp_margin(start) + 1.0  # chosen - rejected log-prob margin grows
    train_rec = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # TRL's names
        assert isinstance(train_rec[key], float), key
    assert train_rec["rewards/margins"] == pytest.approx(train_rec["rewards/chosen"] - train_rec["rewards/rejected"])
    for png in ("loss.png", "rewards_accuracies.png", "rewards_margins.png", "logps_chosen.png", "logps_rejected.png"):
        assert (run / png).exists(), png
    assert (run / "ckpt" / "model.safetensors").exists() and (run / "ckpt" / "tokenizer").is_dir()


def test_ipo_online_reference_cli(tmp_path):
    ckpt = _make_ckpt(tmp_path / "init")
    pairs = _make_pairs(tmp_path / "pairs.jsonl", n=40)
    run = tmp_path / "run"
    p = run_cli("dpo", "--init", ckpt, "--data", pairs, "--beta", "0.5", "--loss", "ipo", "--reference", "online",
                "--out", run, "--max_steps", "6", "--batch_size", "4", "--lr", "3e-3", "--dtype", "fp32",
                "--eval_interval", "3", "--warmup_steps", "0", env={"OMP_NUM_THREADS": "1"})
    assert "held-out implicit-reward accuracy" in p.stdout
    evals = _evals(run)
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # the IPO loss falls on held-out pairs
    assert not (run / "ref_logprobs.safetensors").exists()  # online reference: nothing precomputed


def test_bad_pairs_and_options_are_clear_errors(tmp_path):
    ckpt = _make_ckpt(tmp_path / "init")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a"}) + "\n")
    p = run_cli("dpo", "--init", ckpt, "--data", bad, "--out", tmp_path / "run", check=False)
    assert p.returncode == 2
    assert f"{bad}:2" in p.stderr and "rejected" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    from pocketgpt import UserError
    from pocketgpt.train.dpo import DPOConfig

    for field, value in (("beta", 0.0), ("loss", "hinge"), ("reference", "never"), ("label_smoothing", 0.7)):
        with pytest.raises(UserError, match=field):
            DPOConfig.from_dict({"data": ["x"], field: value})
