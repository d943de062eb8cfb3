"""GRPO: group advantages and the clipped objective, the arithmetic task, a measured held-out accuracy gain after a
brief SFT on the task format, and clear errors for bad reward functions and prompt files."""

import json

import pytest
import torch

from conftest import run_cli
from pocketgpt import GPT, GPTConfig, UserError
from pocketgpt.tasks import first_integer, get_task
from pocketgpt.train.grpo import group_advantages, grpo_loss




def _base_ckpt(path, n_embd=64):
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("char", ["What is 0123456789 + - ?"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=n_embd))
    model.save_pretrained(path)
    tok.save(path / "tokenizer")
    return path


# ---- the maths -------------------------------------------------------------------------------------------------------


def test_group_advantages_and_clipped_objective():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    g = a.view(2, 4)
    assert torch.allclose(g[0].mean(), torch.tensor(0.0), atol=1e-6) and g[0, 0] > 0 > g[0, 1]
    assert torch.allclose(g[0].std(unbiased=False), torch.tensor(1.0), atol=1e-3)
    assert torch.all(g[1] == 0)  # a group where every reply scored the same carries no signal

    # ratio 1 (on-policy): the gradient raises the log-prob of a positive-advantage reply, lowers a negative one
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, m = grpo_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.all(logp.grad[0, :2] < 0) and torch.all(logp.grad[1] > 0) and logp.grad[0, 2] == 0
    assert m["clip_frac"] == 0.0
    # beyond the clip range in the advantage's direction: no gradient (the update is already large enough)
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert torch.all(logp.grad == 0) and m["clip_frac"] == 1.0
    # the k3 KL is >= 0, zero at the reference, and pulls the policy back towards it
    logp = torch.full((1, 2), -1.0, requires_grad=True)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool),
                        ref_logp=torch.full((1, 2), -0.5), kl_coef=1.0)
    loss.backward()
    assert m["kl"] > 0 and torch.all(logp.grad < 0)


def test_arithmetic_task():
    task = get_task("arithmetic", digits=2, ops="+-", n_eval=50)
    held = task.eval_prompts()
    assert len(held) == 50 and held == task.eval_prompts()  # fixed
    train = task.train_prompts(500, seed=3)
    assert train == task.train_prompts(500, seed=3) and train != task.train_prompts(500, seed=4)
    assert not {p[0]["content"] for p in held} & {p[0]["content"] for p in train}  # disjoint
    p = [{"role": "user", "content": "What is 37 + 58?"}]
    assert task.target(p) == 95 and task.reward(p, "95") == 1.0 and task.reward(p, "The answer is 95.") == 1.0
    assert task.reward(p, "94") == 0.0 and task.reward(p, "9 5") == 0.0 and task.reward(p, "") == 0.0
    assert task.reward([{"role": "user", "content": "What is 12 - 40?"}], "-28") == 1.0
    assert first_integer("x -3 and 4") == -3
    for c in task.sft_conversations(20):
        q, a = c["messages"]
        assert task.reward([q], a["content"]) == 1.0  # worked examples are right
    for kw, field in ((dict(digits=0), "digits"), (dict(ops="*"), "ops"), (dict(n_eval=10**6), "n_eval")):
        with pytest.raises(UserError, match=field):
            get_task("arithmetic", **kw)
    with pytest.raises(UserError, match="unknown task"):
        get_task("chess")


# ---- the measured gain -----------------------------------------------------------------------------------------------


def test_grpo_raises_heldout_accuracy_after_brief_sft(tmp_path, one_thread):
    """Brief SFT on the task format (through the SFT stage), then GRPO: greedy held-out accuracy goes up."""
    from pocketgpt.train.grpo import GRPOConfig, run_grpo
    from pocketgpt.train.sft import SFTConfig, run_sft
    from pocketgpt.train.trainer import TrainConfig

    task = get_task("arithmetic", digits=1, ops="+", n_eval=50)
    base = _base_ckpt(tmp_path / "base")
    sft_data = task.write_sft_jsonl(tmp_path / "sft.jsonl", 5000, seed=0)
    quiet = dict(dtype="fp32", weight_decay=0.0, warmup_steps=0, schedule="constant", progress=False, grad_clip=0.0)
    run_sft(base, tmp_path / "sft", SFTConfig(data=[str(sft_data)], val_fraction=0.02),
            TrainConfig(max_steps=400, batch_size=32, lr=3e-3, min_lr=3e-3, eval_interval=0, ckpt_interval=0,
                        log_interval=100, **quiet), resume=False, log=lambda s: None)

    run = tmp_path / "grpo"
    opts = GRPOConfig(init=str(tmp_path / "sft" / "ckpt"), task="arithmetic", task_digits=1, task_ops="+", n_eval=50,
                      group_size=8, max_new_tokens=4)
    result = run_grpo(opts, run, TrainConfig(max_steps=60, batch_size=16, lr=1e-3, min_lr=1e-3, eval_interval=10,
                                             ckpt_interval=0, log_interval=5, **quiet), log=lambda s: None)
    curve = result["curve"]
    assert [s for s, _ in curve] == [0, 10, 20, 30, 40, 50, 60]
    before, after = curve[0][1], curve[-1][1]
    assert 0.0 < before < 1.0, curve  # the SFT'd model solves some held-out problems, not all
    assert after > before, curve
    assert sum(a for _, a in curve[1:]) / (len(curve) - 1) > before, curve  # above the start on average, too
    assert max(a for _, a in curve) == result["best_accuracy"]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward" in r]
    assert train and all(0 <= r["reward"] <= 1 and r["reply_len"] >= 1 for r in train)
    assert (run / "accuracy.png").exists() and (run / "reward.png").exists()
    assert (run / "ckpt" / "model.safetensors").exists()


# ---- user reward functions and prompt files ------------------------------------------------------------------------------


def test_user_reward_fn_kl_and_inner_steps(tmp_path, one_thread):
    from pocketgpt.train.grpo import GRPOConfig, run_grpo
    from pocketgpt.train.trainer import TrainConfig

    ckpt = _base_ckpt(tmp_path / "base", n_embd=32)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(10)))
    (tmp_path / "rewards.py").write_text("def short(prompt, reply):\n    return -len(reply)\n")
    opts = GRPOConfig(init=str(ckpt), reward_fn=f"{tmp_path / 'rewards.py'}:short", prompts=str(prompts),
                      group_size=4, max_new_tokens=6, kl_coef=0.1, inner_steps=2, n_eval=2)
    def train(steps):
        cfg = TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, dtype="fp32", eval_interval=2, ckpt_interval=2,
                          progress=False, warmup_steps=0, log_interval=1)
        return run_grpo(opts, tmp_path / "run", cfg, log=lambda s: None)

    train(4)
    result = train(6)  # resumes from the step-4 checkpoint
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "kl" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(r["kl"] >= 0 for r in steps)
    assert steps[0]["kl"] < 1e-6  # the policy starts at the reference
    assert steps[0]["reward"] == steps[1]["reward"]  # inner step 2 reuses rollout 1
    assert "eval_reward" in result and [r["step"] for r in records if "eval_reward" in r] == [0, 2, 4, 6]


def test_reward_fn_that_raises_names_the_record(tmp_path):
    ckpt = _base_ckpt(tmp_path / "base", n_embd=32)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(3)))
    (tmp_path / "rewards.py").write_text("def boom(prompt, reply):\n    raise ValueError('no score for ' + reply)\n")
    p = run_cli("grpo", "--init", ckpt, "--reward-fn", f"{tmp_path / 'rewards.py'}:boom", "--prompts", prompts,
                "--out", tmp_path / "run", "--max_steps", "1", "--batch_size", "2", "--group-size", "2",
                "--max_new_tokens", "2", check=False, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]  # (after the run's info line)
    assert line.startswith("pocketgpt grpo: error: ")
    assert f"{prompts}:" in line and "boom raised ValueError" in line


def test_bad_prompts_and_reward_fns_are_clear_errors(tmp_path):
    from pocketgpt.train.grpo import GRPOConfig, PromptSource

    (tmp_path / "rewards.py").write_text("def nan(prompt, reply):\n    return float('nan')\n"
                                         "def text(prompt, reply):\n    return 'good'\n")
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    cases = {
        "notjson": (good + "\n{oops\n", ":2: not valid JSON"),
        "norole": (good + "\n" + good + "\n" + json.dumps({"messages": [{"content": "hi"}]}) + "\n", ":3:"),
        "assistant_only": (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n", ":1:"),
        "nofield": (good + "\n" + json.dumps({"text": "hi"}) + "\n", ":2:"),
    }
    for name, (text, where) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        opts = GRPOConfig(reward_fn=f"{tmp_path / 'rewards.py'}:nan", prompts=str(path))
        with pytest.raises(UserError, match=f"{path}{where}".replace("{", r"\{")):
            PromptSource(opts, seed=0)
    prompts = tmp_path / "ok.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    for fn, what in (("nan", "returned nan"), ("text", "returned 'good'")):
        src = PromptSource(GRPOConfig(reward_fn=f"{tmp_path / 'rewards.py'}:{fn}", prompts=str(prompts)), seed=0)
        batch, records = src.sample(1, key=0)
        with pytest.raises(UserError, match=f"{prompts}:\\d+: .*{what}"):
            src.reward(batch[0], "reply", records[0])
    for kw, msg in ((dict(reward_fn="nosuchmodule_xyz:f", prompts=str(prompts)), "cannot import"),
                    (dict(task="arithmetic", reward_fn="m:f"), "exclude"), (dict(), "--task or --reward-fn"),
                    (dict(reward_fn="m:f"), "--prompts"), (dict(task="arithmetic", group_size=1), "group_size")):
        with pytest.raises(UserError, match=msg):
            PromptSource(GRPOConfig(**kw).validate(), seed=0)
