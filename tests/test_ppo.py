"""PPO: a scripted reward is learned (held-out reward rises, KL stays bounded), the RM path runs end to end with its
metrics and plots, runs resume, and bad prompts / failing reward functions stop with a message naming the record."""

import json
import random

import pytest
import torch

from pocketgpt import GPT, GPTConfig, UserError
from pocketgpt.cli import main as cli_main

REWARD_FNS = '''
def zfrac(prompt, reply):
    """The target: the share of 'z' characters in the reply."""
    return reply.count("z") / max(1, len(reply))

CALLS = [0]

def boom(prompt, reply):
    """Fine for the first rollout batch; from the second on, fails on prompts that contain a 'q'."""
    CALLS[0] += 1
    if CALLS[0] > 48 and "q" in prompt[-1]["content"]:
        raise ValueError("no q allowed")
    return 0.0

def not_a_number(prompt, reply):
    return "high"
'''




def make_policy(path, alphabet="abcz "):
    """A tiny random GPT over a few characters: it already says 'z' now and then, rarely."""
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("char", [alphabet])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32))
    model.save_pretrained(path)
    tok.save(path / "tokenizer")
    return path


def write_prompts(path, n, seed=0, letters="abc "):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))}) + "\n")
    return path


def ppo_config(**kw):
    from pocketgpt.config import load_config
    from pocketgpt.train.ppo import _sections

    ov = {"train.max_steps": 24, "train.lr": 3e-3, "train.min_lr": 3e-3, "train.eval_interval": 0,
          "train.ckpt_interval": 0, "train.log_interval": 4, "train.dtype": "fp32", "train.warmup_steps": 0,
          "train.schedule": "constant", "train.progress": False,
          "ppo.max_new_tokens": 8, "ppo.kl_coef": 0.05, "ppo.eval_prompts": 8, "ppo.rollout_prompts": 16}
    ov.update(kw)
    return load_config("ppo-tiny", ov, _sections())


def run(capsys, *args):
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def setup(tmp_path):
    policy = make_policy(tmp_path / "sft")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 48)
    fns = tmp_path / "rewards.py"
    fns.write_text(REWARD_FNS)
    return tmp_path, policy, prompts, fns


def test_scripted_reward_rises_with_bounded_kl(setup, one_thread):
    from pocketgpt.tokenizer import load_tokenizer_for
    from pocketgpt.train.ppo import PPOConfig, Scorer, evaluate_policy, train_ppo
    from pocketgpt.train.rl_common import load_reward_fn, read_prompts_with_lines

    d, policy, prompts, fns = setup
    held_out = write_prompts(d / "held_out.jsonl", 32, seed=99)
    zfrac = load_reward_fn(f"{fns}:zfrac")
    result = train_ppo(policy, prompts, d / "run", ppo_config(), reward_fn=zfrac, eval_prompts_path=held_out,
                       resume=False)
    assert result["step"] == 24

    tok = load_tokenizer_for(policy)
    ev, lines = read_prompts_with_lines(held_out)
    scorer, cfg = Scorer(reward_fn=zfrac), PPOConfig(max_new_tokens=8)
    reference = GPT.from_pretrained(policy)
    before = evaluate_policy(GPT.from_pretrained(policy), tok, ev, lines, scorer, cfg, reference=reference)
    after = evaluate_policy(GPT.from_pretrained(d / "run" / "ckpt"), tok, ev, lines, scorer, cfg, reference=reference)
    # same held-out prompts, same sampling settings and seed: the trained policy earns clearly more
    assert after["reward"] > before["reward"] + 0.08 and after["reward"] > 3 * before["reward"], (before, after)
    assert abs(before["kl"]) < 1e-4
    assert 0 < after["kl"] < 8.0, after  # nats per 8-token reply: moved, but held near the reference

    records = [json.loads(l) for l in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    for key in ("reward", "kl", "entropy", "clip_frac", "approx_kl", "vf_loss"):
        assert key in train[-1], key


def test_ppo_with_reward_model_end_to_end_and_resume(tmp_path, capsys, one_thread):
    from pocketgpt.train.reward import train_reward_model
    from test_reward import make_init_checkpoint, rm_config, write_synthetic_pairs

    policy = make_init_checkpoint(tmp_path / "sft")  # shares the RM's tokenizer: letters, ' ', '!', '.'
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", 80)
    train_reward_model(policy, pairs, tmp_path / "rm", rm_config(max_steps=8), resume=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 24, letters="abcdefg ")
    common = ["ppo", "--policy", policy, "--reward", tmp_path / "rm" / "ckpt", "--prompts", prompts,
              "--out", tmp_path / "ppo", "--rollout_prompts", 8, "--eval_prompts", 4, "--max_new_tokens", 8,
              "--batch_size", 4, "--ppo_epochs", 1, "--eval_interval", 2, "--ckpt_interval", 2,
              "--log_interval", 1, "--dtype", "fp32", "--progress", "false", "--ref_dtype", "bf16"]
    rc, out, err = run(capsys, *common, "--max_steps", 2)
    assert rc == 0, err
    assert "peak RSS" in out
    run_dir = tmp_path / "ppo"
    for name in ("reward.png", "kl.png", "loss.png", "metrics.jsonl", "run_config.toml"):
        assert (run_dir / name).is_file(), name
    GPT.from_pretrained(run_dir / "ckpt")  # the policy is an ordinary checkpoint (chat / export load it)
    assert (run_dir / "ckpt" / "value_head.safetensors").is_file()

    rc, out, err = run(capsys, *common, "--max_steps", 4)  # the same command, longer: resumes
    assert rc == 0, err
    assert "resuming ppo" in err and "at step 2" in err
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all("reward" in r and "kl" in r for r in records if "loss" in r)
    state = json.loads((run_dir / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["stage_state"]["rollouts_done"] == 2


def test_reward_fn_that_raises_stops_cleanly_naming_record_and_step(setup, capsys, one_thread):
    d, policy, prompts, fns = setup
    lines = prompts.read_text().splitlines()
    lines[30] = json.dumps({"prompt": "aqa"})  # line 31 makes the function raise once it is sampled
    prompts.write_text("\n".join(lines) + "\n")
    held_out = write_prompts(d / "held_out.jsonl", 4, seed=5)
    # every rollout uses all 48 prompts; 2 optimizer steps per rollout; the second rollout (step 3) fails
    rc, out, err = run(capsys, "ppo", "--policy", policy, "--reward-fn", f"{fns}:boom", "--prompts", prompts,
                       "--eval-prompts", held_out, "--out", d / "run", "--rollout_prompts", 48, "--batch_size", 24,
                       "--ppo_epochs", 1, "--max_new_tokens", 4, "--max_steps", 6, "--eval_interval", 0,
                       "--ckpt_interval", 2, "--dtype", "fp32", "--progress", "false")
    assert rc == 2
    msg = err.strip().splitlines()[-1]
    assert msg.startswith("pocketgpt ppo: error:") and "Traceback" not in err
    assert f"{prompts}:31" in msg and "ValueError: no q allowed" in msg and "step 3" in msg
    state = json.loads((d / "run" / "ckpt" / "trainer_state.json").read_text())  # the last checkpoint is kept
    assert state["step"] == 2 and "checkpoint of step 2" in msg
    GPT.from_pretrained(d / "run" / "ckpt")


def test_reward_fn_returning_non_number(setup, capsys):
    from pocketgpt.train.rl_common import call_reward_fn, load_reward_fn

    d, policy, prompts, fns = setup
    fn = load_reward_fn(f"{fns}:not_a_number")
    with pytest.raises(UserError, match=r"prompts.jsonl:7: reward function not_a_number returned 'high'"):
        call_reward_fn(fn, [{"role": "user", "content": "x"}], "y", record="prompts.jsonl:7")
    with pytest.raises(UserError, match="returned nan"):
        call_reward_fn(lambda p, r: float("nan"), [], "y", record="a:1")
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        load_reward_fn(f"{fns}:missing")
    with pytest.raises(UserError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 5}', "must be a non-empty list of messages"),
    ('{"messages": [{"role": "user"}]}', "content must be a string"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "must end with a user message"),
    ("{broken", "not valid JSON"),
    ('{"text": "x"}', "expected a 'messages' list or a 'prompt'"),
])
def test_bad_prompts_name_file_and_line(tmp_path, capsys, line, message):
    from pocketgpt.train.rl_common import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2:") and message in str(e.value)


def test_gae_matches_discounted_sums():
    from pocketgpt.train.ppo import gae

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


def test_rollout_and_logprobs_match_a_plain_forward(setup, one_thread):
    """Rollouts keep the closing <|end|> in reply_ids (not in text); batched log-probs equal per-row forwards."""
    from pocketgpt.tokenizer import load_tokenizer_for
    from pocketgpt.train.rl_common import rollout, sequence_logprobs_batch

    d, policy, prompts, fns = setup
    tok = load_tokenizer_for(policy)
    model = GPT.from_pretrained(policy)
    end = tok.token_id("<|end|>")
    msgs = [[{"role": "user", "content": "ab"}], [{"role": "user", "content": "c ab ca"}]]
    rolls = rollout(model, tok, msgs, n=3, max_new_tokens=12, seed=0)
    assert [r.prompt_index for r in rolls] == [0, 0, 0, 1, 1, 1]
    for r in rolls:
        assert len(r.logprobs) == len(r.reply_ids)
        assert (r.reply_ids[-1] == end) == (r.finish_reason == "stop")
        assert "<|end|>" not in r.text and r.text == tok.decode([t for t in r.reply_ids if t != end])
    logp, mask = sequence_logprobs_batch(model, [r.prompt_ids for r in rolls], [r.reply_ids for r in rolls])
    for b, r in enumerate(rolls):
        ids = torch.tensor([r.prompt_ids + r.reply_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(ids)[0][0].float(), -1)
        n, p = len(r.reply_ids), len(r.prompt_ids)
        want = full[p - 1: p - 1 + n].gather(-1, torch.tensor(r.reply_ids)[:, None])[:, 0]
        torch.testing.assert_close(logp[b, :n].detach(), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-5, rtol=1e-4)
        assert mask[b, :n].all() and not mask[b, n:].any()
