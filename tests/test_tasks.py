"""Checkable tasks (``pocketgpt.tasks``) and ``pocketgpt pairs``: preference pairs from a model's checked replies."""

import json

import pytest

from pocketgpt.errors import UserError
from pocketgpt.checkpoint import save_model
from pocketgpt.tasks import get_task, make_pairs

from conftest import run_cli


def _texts(prompts):
    return [p[-1]["content"] for p in prompts]


def test_held_out_prompts_are_fixed_and_never_trained_on():
    task = get_task("arithmetic", digits=2, ops="+", n_eval=400)
    held = _texts(task.eval_prompts())
    assert len(held) == len(set(held)) == 400
    assert held == _texts(get_task("arithmetic", digits=2, ops="+", n_eval=400).eval_prompts())
    # a stage that evaluates fewer prompts sees a prefix of the same set, and its training prompts avoid the
    # whole pool, so it never trains on a prompt that another stage evaluates
    small = get_task("arithmetic", digits=2, ops="+", n_eval=64)
    assert _texts(small.eval_prompts()) == held[:64]
    train = set(_texts(small.train_prompts(20000, seed=0)))
    assert len(train) > 5000 and not train & set(held)
    sft_questions = {c["messages"][0]["content"] for c in task.sft_conversations(3000, seed=1)}
    assert not sft_questions & set(held)


def test_unique_training_prompts_and_limits():
    task = get_task("arithmetic", digits=1, ops="+", n_eval=16)
    assert task.held_out_pool == 50
    ps = _texts(task.train_prompts(50, seed=3, unique=True))
    assert len(set(ps)) == 50  # every training problem exactly once
    with pytest.raises(UserError, match="only 50 distinct"):
        task.train_prompts(51, seed=3, unique=True)
    with pytest.raises(UserError, match="n_eval must be in 1..50"):
        get_task("arithmetic", digits=1, ops="+", n_eval=51)
    with pytest.raises(UserError, match="unknown option 'digitz'"):
        get_task("arithmetic", digitz=2)
    with pytest.raises(UserError, match="unknown task"):
        get_task("sorting")


def test_checker_reads_the_answer_from_the_question():
    task = get_task("arithmetic", digits=2, ops="+-")
    q = [{"role": "user", "content": "What is 37 - 58?"}]
    assert task.target(q) == -21
    assert task.reward(q, "-21") == 1.0 and task.reward(q, "It is -21.") == 1.0
    assert task.reward(q, "21") == 0.0 and task.reward(q, "") == 0.0 and task.reward(q, "21 or -21") == 0.0
    three = get_task("arithmetic", digits=1, ops="+", operands=3, n_eval=10)
    p = three.eval_prompts(1)[0]
    a = [int(x) for x in p[-1]["content"][len("What is "):-1].split(" + ")]
    assert len(a) == 3 and three.target(p) == sum(a)
    # a task's own worked examples are right by its checker
    for c in task.sft_conversations(50, seed=0):
        assert task.reward(c["messages"][:1], c["messages"][1]["content"]) == 1.0


def test_largest_task_and_options_as_text():
    task = get_task("largest", "k=4,n_eval=400")
    assert (task.k, task.digits, task.n_eval) == (4, 2, 400)
    assert get_task("arithmetic", "digits=1,ops=+").ops == "+"
    held = task.eval_prompts()
    assert len(set(_texts(held))) == 400 and not set(_texts(task.train_prompts(5000, seed=0))) & set(_texts(held))
    q = [{"role": "user", "content": "Which is the largest: 47, 82, 15, 80?"}]
    assert task.target(q) == 82
    assert task.reward(q, "82") == 1.0 and task.reward(q, "80") == 0.0 and task.reward(q, "") == 0.0
    nums = [int(x) for x in held[0][-1]["content"].split(": ")[1][:-1].split(", ")]
    assert len(nums) == 4 and all(10 <= x <= 99 for x in nums) and task.target(held[0]) == max(nums)
    for c in task.sft_conversations(50, seed=0):
        assert task.reward(c["messages"][:1], c["messages"][1]["content"]) == 1.0
    with pytest.raises(UserError, match="k must be"):
        get_task("largest", k=1)
    with pytest.raises(UserError, match="--task_options: expected name=value"):
        get_task("largest", "k=3,digits")
    with pytest.raises(ValueError, match="not a largest question"):
        task.target([{"role": "user", "content": "What is 2 + 3?"}])


def test_largest_imperfect_demonstrations_answer_the_first_number():
    """demo_accuracy < 1: SFT rows answer the first number listed with probability 1 - demo_accuracy; nothing else
    changes (held-out set, checker), and one-digit numbers are 0-9 (10**k problems)."""
    exact = get_task("largest", "k=4,digits=1,n_eval=400")
    task = get_task("largest", "k=4,digits=1,demo_accuracy=0.4,n_eval=400")
    assert task.demo_accuracy == 0.4 and task.num_problems == 10_000 and task.held_out_pool == 1000
    assert _texts(task.eval_prompts()) == _texts(exact.eval_prompts())
    rows = task.sft_conversations(4000, seed=0)
    nums = [[int(x) for x in c["messages"][0]["content"].split(": ")[1][:-1].split(", ")] for c in rows]
    answers = [int(c["messages"][1]["content"]) for c in rows]
    first = sum(a == n[0] != max(n) for a, n in zip(answers, nums)) / len(rows)
    right = sum(a == max(n) for a, n in zip(answers, nums)) / len(rows)
    assert all(a in (n[0], max(n)) for a, n in zip(answers, nums))
    # P(first is not the largest) = 1 - sum((v + 1)**3) / 10**4 = 0.6975; 60% of those rows answer it
    assert abs(first - 0.6 * 0.6975) < 0.03 and abs(right - (1 - 0.6 * 0.6975)) < 0.03
    assert rows == task.sft_conversations(4000, seed=0)  # seeded
    assert all(exact.reward(c["messages"][:1], c["messages"][1]["content"]) == 1.0
               for c in exact.sft_conversations(200, seed=0))
    with pytest.raises(UserError, match="demo_accuracy must be"):
        get_task("largest", "demo_accuracy=1.5")


def test_make_pairs_pairs_right_with_wrong_replies_of_the_same_prompt():
    task = get_task("arithmetic", digits=1, ops="+", n_eval=16)
    p1 = [{"role": "user", "content": "What is 2 + 3?"}]
    p2 = [{"role": "user", "content": "What is 4 + 4?"}]
    p3 = [{"role": "user", "content": "What is 1 + 1?"}]
    replies = [["5", "6", "6", "7"],  # one right, two distinct wrong
               ["8", "8", "8", "8"],  # all right: no pair
               ["3", "4", "5", "0"],  # all wrong: no pair
               ["2", "", " ", "2"]]  # right, and blank replies: wrong but no pair (a pair needs text on both sides)
    prompts = [p1, p2, p3, [{"role": "user", "content": "What is 1 + 1?"}]]
    pairs, stats = make_pairs(task, prompts, replies, max_pairs_per_prompt=2)
    assert pairs == [{"prompt": p1, "chosen": "5", "rejected": "6"}, {"prompt": p1, "chosen": "5", "rejected": "7"}]
    assert stats == {"prompts": 4, "replies": 16, "sample_accuracy": 7 / 16, "prompts_with_pairs": 1, "pairs": 2}
    one, _ = make_pairs(task, [p1], replies[:1], max_pairs_per_prompt=1)
    assert len(one) == 1


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A tiny chat model (random weights) with the chat tokens: its replies are mostly wrong, a few right."""
    from pocketgpt import GPT, GPTConfig, Tokenizer

    d = tmp_path_factory.mktemp("pairs")
    text = d / "t.txt"
    text.write_text("What is 12 + 34? 46. 0123456789 + = ?\n" * 50)
    tok = Tokenizer.train("char", [str(text)])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_model(model, d / "ckpt")
    tok.save(d / "ckpt" / "tokenizer")
    return d / "ckpt"


def test_pairs_command_writes_standard_pairs_split_by_prompt(chat_ckpt, tmp_path):
    opts = ["--ckpt", chat_ckpt, "--task", "arithmetic", "--task_options", "digits=1,ops=+",
            "--samples", "8", "--max-new-tokens", "2", "--temperature", "3.0"]
    run_cli("pairs", *opts, "--prompts", "50", "--out", tmp_path / "train.jsonl", "--stats", tmp_path / "tr.json")
    run_cli("pairs", *opts, "--split", "eval", "--prompts", "30", "--out", tmp_path / "held.jsonl",
            "--stats", tmp_path / "ho.json")
    task = get_task("arithmetic", digits=1, ops="+", n_eval=30)
    held = set(_texts(task.eval_prompts()))
    seen = {}
    for name in ("train", "held"):
        rows = [json.loads(ln) for ln in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert rows, name
        for r in rows:
            assert set(r) == {"prompt", "chosen", "rejected"}
            assert r["prompt"][-1]["role"] == "user" and isinstance(r["chosen"], str)
            assert task.reward(r["prompt"], r["chosen"]) == 1.0 and task.reward(r["prompt"], r["rejected"]) == 0.0
        seen[name] = set(_texts(r["prompt"] for r in rows))
    assert seen["held"] <= held and not seen["train"] & held  # split by prompt
    st = json.loads((tmp_path / "tr.json").read_text())
    assert st["prompts"] == 50 and st["replies"] == 400 and st["pairs"] == len(
        (tmp_path / "train.jsonl").read_text().splitlines())
    # the RM reads these pairs as they are
    from pocketgpt.train.reward import read_pairs

    assert len(read_pairs(tmp_path / "train.jsonl")) == st["pairs"]


def test_pairs_command_bad_input_is_one_line(chat_ckpt, tmp_path):
    p = run_cli("pairs", "--ckpt", chat_ckpt, "--samples", "1", "--prompts", "4", "--out", tmp_path / "x.jsonl",
                check=False)
    assert p.returncode == 2 and "--samples" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("pairs", "--ckpt", chat_ckpt, "--task", "nope", "--prompts", "4", "--out", tmp_path / "x.jsonl",
                check=False)
    assert p.returncode == 2 and "unknown task" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("pairs", "--ckpt", chat_ckpt, "--task_options", "k3", "--prompts", "4", "--out", tmp_path / "x.jsonl",
                check=False)
    assert p.returncode == 2 and "--task_options" in p.stderr and "'k3'" in p.stderr and "Traceback" not in p.stderr
