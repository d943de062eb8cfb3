"""The on-policy RL stages (PPO, GRPO, RLOO) on their one experience loop: the maths, a bandit each must solve,
exact ratios and KL, reward sources, clear errors, exact resume mid-rollout and torchrun."""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, run_cli
from pocketgpt import GPT, GPTConfig, UserError
from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.train.grpo import group_advantages, grpo_loss
from pocketgpt.train.ppo import gae

REWARDS = '''
def first_z(prompt, reply):
    """The bandit: reward 1 when the reply starts with 'z'."""
    return 1.0 if reply[:1] == "z" else 0.0

def boom(prompt, reply):
    if "q" in prompt[-1]["content"]:
        raise ValueError("no q allowed")
    return 0.0

def count_a(prompt, reply):
    return reply.count("a")

def nan(prompt, reply):
    return float("nan")

def text(prompt, reply):
    return "high"
'''


def make_policy(path):
    """A tiny random chat GPT over a few characters: every token about equally likely."""
    from pocketgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

    tok = Tokenizer.train("char", ["abcqz "])
    tok.add_special_tokens(SPECIAL_TOKENS)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)), path)
    tok.save(path / "tokenizer")
    return path


@pytest.fixture
def setup(tmp_path):
    policy = make_policy(tmp_path / "sft")
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "".join(rng.choice("abc ") for _ in range(rng.randint(3, 8)))})
                               + "\n" for _ in range(48)))
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path, policy, prompts, tmp_path / "rewards.py"


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def p_first(ckpt, token="z"):
    """Probability that the policy's reply to a held-out-like prompt starts with ``token`` (temperature 1)."""
    from pocketgpt.chat import render
    from pocketgpt.tokenizer import load_tokenizer_for

    tok, model = load_tokenizer_for(ckpt), load_model(ckpt).eval()
    ids, _ = render([{"role": "user", "content": "ab c"}], tok, add_generation_prompt=True)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return float(logits[0, -1].float().softmax(-1)[tok.encode(token)[0]])


# ---- the maths -------------------------------------------------------------------------------------------------------


def test_group_advantages_and_clipped_objective():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    g = group_advantages(r, 4).view(2, 4)
    assert abs(float(g[0].mean())) < 1e-6 and g[0, 0] > 0 > g[0, 1]
    assert abs(float(g[0].std(unbiased=False)) - 1.0) < 1e-3
    assert torch.all(g[1] == 0)  # a group where every reply scored the same carries no signal
    loo = group_advantages(r, 4, "rloo").view(2, 4)  # reward minus the mean of the other three
    assert torch.allclose(loo[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3])) and torch.all(loo[1] == 0)

    # ratio 1 (on-policy): the gradient raises the log-prob of a positive-advantage reply, lowers a negative one
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, m = grpo_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.all(logp.grad[0, :2] < 0) and torch.all(logp.grad[1] > 0) and logp.grad[0, 2] == 0
    assert m["clip_ratio"] == 0.0 and m["val/ratio"] == 1.0
    # beyond the clip range in the advantage's direction: no gradient (the update is already large enough)
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert torch.all(logp.grad == 0) and m["clip_ratio"] == 1.0
    # the k3 KL is >= 0, zero at the reference, and pulls the policy back towards it
    logp = torch.full((1, 2), -1.0, requires_grad=True)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool),
                        ref_logp=torch.full((1, 2), -0.5), kl_coef=1.0)
    loss.backward()
    assert m["kl"] > 0 and torch.all(logp.grad < 0)


def test_gae_matches_discounted_sums():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    values = values * mask
    gamma = 0.9
    adv, ret = gae(rewards, values, mask, gamma, 1.0)  # λ = 1: advantage = discounted return - V
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            g = sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, n))
            assert float(ret[b, t]) == pytest.approx(g, abs=1e-5)
            assert float(adv[b, t]) == pytest.approx(g - float(values[b, t]), abs=1e-5)
        assert torch.all(adv[b, n:] == 0)
    adv0, _ = gae(rewards, values, mask, gamma, 0.0)  # λ = 0: one-step TD error
    assert float(adv0[0, 1]) == pytest.approx(float(rewards[0, 1] + gamma * values[0, 2] - values[0, 1]), abs=1e-5)


def test_rollout_keeps_end_and_logprobs_are_those_of_the_tempered_policy(setup):
    """Rollouts keep the closing <|end|> in reply_ids (not in text); the one log-prob function equals a plain
    forward's log_softmax(logits / T) at every reply token, batched with padding."""
    from pocketgpt.engine import pack_replies, token_logprobs
    from pocketgpt.tokenizer import load_tokenizer_for
    from pocketgpt.train.rl import rollout

    _, policy, _, _ = setup
    tok, model = load_tokenizer_for(policy), load_model(policy)
    end = tok.token_id("<|end|>")
    msgs = [[{"role": "user", "content": "ab"}], [{"role": "user", "content": "c ab ca"}]]
    rolls = rollout(model, tok, msgs, n=3, max_new_tokens=12, temperature=0.7, seed=0)
    assert [r.prompt_index for r in rolls] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(r.reply_ids) for r in rolls}) > 1  # sampled, not six copies
    for r in rolls:
        assert (r.reply_ids[-1] == end) == (r.finish_reason == "stop")
        assert "<|end|>" not in r.text and r.text == tok.decode([t for t in r.reply_ids if t != end])
    with torch.no_grad():
        logp, _, _ = token_logprobs(model, *pack_replies([r.prompt_ids for r in rolls], [r.reply_ids for r in rolls]),
                                    temperature=0.7)
        for b, r in enumerate(rolls):
            full = torch.log_softmax(model(torch.tensor([r.prompt_ids + r.reply_ids]))[0][0].float() / 0.7, -1)
            n, p = len(r.reply_ids), len(r.prompt_ids)
            want = full[p - 1: p - 1 + n].gather(-1, torch.tensor(r.reply_ids)[:, None])[:, 0]
            torch.testing.assert_close(logp[b, :n], want, atol=1e-5, rtol=1e-4)
            assert torch.all(logp[b, n:] == 0)


# ---- the bandit: each algorithm must find the rewarded token ------------------------------------------------------------


@pytest.mark.parametrize("stage, opts", [
    ("ppo", ["--kl_coef", "0.02", "--rollout_prompts", "32", "--epochs", "2", "--batch_size", "16",
             "--vf_coef", "0.5"]),
    ("grpo", ["--kl_coef", "0.02", "--rollout_prompts", "8", "--n", "8", "--epochs", "2", "--batch_size", "32"]),
    ("grpo", ["--advantage", "rloo", "--rollout_prompts", "8", "--n", "8", "--batch_size", "64"]),
])
def test_bandit_finds_the_rewarded_token_with_exact_ratio_and_kl(setup, stage, opts):
    """Reward 1 for replies starting with 'z': its probability goes from near uniform to > 0.9 in a bounded number
    of steps; the first minibatch of every rollout has a policy ratio of exactly 1; the KL starts at exactly 0."""
    d, policy, prompts, fns = setup
    run = d / "run"
    before = p_first(policy)
    assert before < 0.2
    p = run_cli(stage, "--init", policy, "--reward_fn", f"{fns}:first_z", "--prompts", prompts, "--out", run,
                "--max_new_tokens", 1, "--n_eval", 8, "--max_steps", 40, "--lr", 3e-3, "--min_lr", 3e-3,
                "--eval_interval", 20, "--ckpt_interval", 0, "--log_interval", 1, "--dtype", "fp32", *opts)
    assert "held-out reward (greedy) 0.000 -> 1.000" in p.stdout, p.stdout
    assert p_first(run / "ckpt") > 0.9
    train = [r for r in records(run) if "loss" in r]
    per_rollout = {"ppo": 4, "grpo": 4}[stage] if "rloo" not in opts else 1
    firsts = [r for r in train if (r["step"] - 1) % per_rollout == 0]
    assert firsts and all(r["val/ratio"] == 1.0 for r in firsts)  # exactly: old log-probs = this very forward
    if per_rollout > 1:
        assert any(r["val/ratio"] != 1.0 for r in train)  # later minibatches are off-policy
    kl = "objective/kl" if stage == "ppo" else "kl"
    if "--kl_coef" in opts:
        assert train[0][kl] == 0.0 and train[-1][kl] > 0  # the policy starts as the reference, then moves
    scores = [r["objective/scores"] for r in train]
    assert scores[-1] > 0.8 > 0.3 > scores[0]


# ---- reward sources and bad input ---------------------------------------------------------------------------------------


def test_ppo_on_a_reward_model_with_a_task_monitoring_accuracy(tmp_path):
    """--reward RM + --task: prompts from the task, the RM's score is the reward, the checker only measures."""
    from test_reward import make_init_checkpoint, write_synthetic_pairs

    sft = make_init_checkpoint(tmp_path / "sft")
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", 40)
    run_cli("rm", "--init", sft, "--data", pairs, "--out", tmp_path / "rm", "--max_steps", 4, "--dtype", "fp32",
            env={"CI": "1"})
    run = tmp_path / "ppo"
    p = run_cli("ppo", "--policy", sft, "--reward", tmp_path / "rm" / "ckpt", "--task", "arithmetic",
                "--task_options", "digits=1", "--out", run, "--rollout_prompts", 8, "--n_eval", 4, "--max_new_tokens", 4,
                "--batch_size", 4, "--epochs", 1, "--max_steps", 2, "--eval_interval", 2, "--ckpt_interval", 2,
                "--ref_dtype", "bf16", env={"CI": "1"})
    assert "reward model" in p.stderr and "arithmetic task" in p.stderr
    evals = [r for r in records(run) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and all("eval_reward" in r for r in evals)
    assert all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    load_model(run / "ckpt")  # the policy is an ordinary checkpoint (chat / export load it)
    assert (run / "ckpt" / "value_head.safetensors").is_file()
    for name in ("eval_reward.png", "eval_accuracy.png", "loss.png", "run_config.toml"):
        assert (run / name).is_file(), name


def test_reward_fn_that_raises_stops_naming_record_and_step(setup):
    d, policy, prompts, fns = setup
    lines = prompts.read_text().splitlines()
    lines[30] = json.dumps({"prompt": "aqa"})  # line 31 makes the function raise once a rollout samples it
    prompts.write_text("\n".join(lines) + "\n")
    p = run_cli("ppo", "--policy", policy, "--reward_fn", f"{fns}:boom", "--prompts", prompts, "--out", d / "run",
                "--rollout_prompts", 16, "--batch_size", 8, "--epochs", 1, "--max_new_tokens", 2, "--max_steps", 40,
                "--eval_interval", 0, "--ckpt_interval", 2, "--n_eval", 2, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    msg = p.stderr.strip().splitlines()[-1]
    assert msg.startswith("pocketgpt ppo: error:") and f"{prompts}:31" in msg and "ValueError: no q allowed" in msg
    step = int(msg.split("(step ")[1].split(")")[0])
    state = json.loads((d / "run" / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == step - 1 and f"checkpoint of step {step - 1}" in msg  # nothing lost
    load_model(d / "run" / "ckpt")


def test_reward_fn_results_and_imports_are_checked(setup):
    from pocketgpt.train.rl import call_reward_fn, load_reward_fn

    _, _, _, fns = setup
    with pytest.raises(UserError, match=r"p.jsonl:7: reward function text returned 'high'"):
        call_reward_fn(load_reward_fn(f"{fns}:text"), [], "y", record="p.jsonl:7")
    with pytest.raises(UserError, match="p.jsonl:2: reward function nan returned nan"):
        call_reward_fn(load_reward_fn(f"{fns}:nan"), [], "y", record="p.jsonl:2")
    assert call_reward_fn(lambda p, r: torch.tensor(0.5), [], "y", record="x") == 0.5
    with pytest.raises(UserError, match="has no function 'missing'"):
        load_reward_fn(f"{fns}:missing")
    with pytest.raises(UserError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 5}', "'messages' must be a list"),
    ('{"messages": [{"role": "user"}]}', "no string 'content'"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "must end with a user message"),
    ("{broken", "not valid JSON"),
    ('{"text": "x"}', "expected a 'messages' list or a 'prompt'"),
])
def test_bad_prompts_name_file_and_line(tmp_path, line, message):
    from pocketgpt.train.rl import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2:") and message in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--task", "chess"], "unknown task 'chess'"),
    (["--task", "arithmetic", "--n", "1"], "must be at least 2"),
    (["--prompts", "EMPTY"], "no prompts in this file"),
    (["--task", "arithmetic", "--reward_fn", "x:y", "--reward", "z"], "exclude each other"),
    ([], "--prompts FILE or --task NAME"),
])
def test_bad_setups_are_one_line(setup, args, message):
    d, policy, _, _ = setup
    (d / "EMPTY").write_text("\n\n")
    args = [str(d / a) if a == "EMPTY" else a for a in args]
    p = run_cli("grpo", "--init", policy, "--out", d / "run", *args, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert message in p.stderr.strip().splitlines()[-1]


# ---- exact resume mid-rollout and torchrun ----------------------------------------------------------------------------


def rl_argv(stage, inp, fns, **train):
    opts = {**dict(max_steps=12, batch_size=4, eval_interval=6, ckpt_interval=1, lr=3e-3, log_interval=1,
                   dtype="fp32", device="cpu", progress="false", max_new_tokens=4, n_eval=2, rollout_prompts=4,
                   epochs=2, kl_coef=0.05), **train}
    return [stage, "--init", inp["init"], "--prompts", inp["convs"], "--reward_fn", f"{fns}:count_a",
            "--samples_per_prompt", 2,
            *[x for k, v in opts.items() for x in (f"--{k}", v)]]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_exact_resume_mid_rollout(stage, tmp_path):
    """4 optimizer steps per rollout and a checkpoint after every step: the kill lands inside a rollout's epochs,
    and the resumed run trains on the very same replies (the buffer is in the checkpoint)."""
    from test_resume import check_exact_resume, make_inputs

    inp = make_inputs(tmp_path / "in")
    (tmp_path / "rewards.py").write_text(REWARDS)
    recs = check_exact_resume(rl_argv(stage, inp, tmp_path / "rewards.py"), tmp_path, kill_after=5)
    assert any("eval_reward" in r for r in recs)


DDP_CHECK = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from pocketgpt.train import ppo, grpo, rl
    stage_cls = {"ppo": ppo.PPOStage, "grpo": grpo.GRPOStage}[sys.argv[1]]

    def on_step_end(self, step, model, metrics):  # every rank: the same parameters after every optimizer step
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        assert all(torch.equal(every[0], f) for f in every), f"ranks differ after step {step}"
        print(f"rank {dist.get_rank()} step {step} in sync", flush=True)

    stage_cls.on_step_end = on_step_end
    sys.argv = ["pocketgpt", *sys.argv[1:]]
    from pocketgpt.cli import main
    sys.exit(main())
''')


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_torchrun_two_processes_stay_in_sync(stage, tmp_path):
    from test_resume import make_inputs

    inp = make_inputs(tmp_path / "in", tie=False)
    (tmp_path / "rewards.py").write_text(REWARDS)
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK)
    argv = rl_argv(stage, inp, tmp_path / "rewards.py", max_steps=4, grad_accum=2, batch_size=2, eval_interval=2,
                   ckpt_interval=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *map(str, argv), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    for rank in (0, 1):
        assert all(f"rank {rank} step {s} in sync" in p.stdout for s in (1, 2, 3, 4)), p.stdout
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
