"""SFT: the stage's loss and batches, learning ~50 Q/A pairs end to end through the CLI, `pocketgpt chat` piped and
in a pseudo-terminal, GPT-2 directories as --init, resume, and clear errors."""

import json
import math
import os
import random
import sys

import pytest
import torch

from conftest import run_cli
from pocketgpt import GPT, GPTConfig
from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.chat import IGNORE, ChatSession, render
from pocketgpt.tokenizer import Tokenizer
from pocketgpt.train.sft import SFTConfig, SFTStage, build_examples, collate, epoch_batches, run_sft
from pocketgpt.train.trainer import TrainConfig

# tiny models run fastest on one thread, and the suite runs beside other jobs
ENV = {"OMP_NUM_THREADS": "1", "CI": "1"}
HAN_Q = "山水风火天地日月花草鸟鱼"  # question keys and answers use different characters: no confusable pairs
HAN_A = "云雨雪星河海石木金土竹松"


def make_pairs(n_en=40, n_zh=10, seed=0):
    """Distinct synthetic questions with arbitrary answers: only memorisation can get them right."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnoprstuvwyz"

    def word():
        return "".join(rng.choice(letters) for _ in range(rng.randint(4, 6)))

    pairs, seen = [], set()
    while len(pairs) < n_en:
        q = f"what is {word()}?"
        if q not in seen:
            seen.add(q)
            pairs.append((q, f"it is {word()}"))
    while len(pairs) < n_en + n_zh:
        q = "".join(rng.sample(HAN_Q, 3)) + "是什么？"
        if q not in seen:
            seen.add(q)
            pairs.append((q, "是" + "".join(rng.sample(HAN_A, 3)) + "。"))
    return pairs


def write_conversations(path, pairs, two_turn=0, seed=0):
    """Each pair as a one-turn conversation, plus ``two_turn`` conversations chaining two random pairs (so the
    model also learns to answer after some history)."""
    rng = random.Random(seed)
    convs = [[(q, a)] for q, a in pairs] + [rng.sample(pairs, 2) for _ in range(two_turn)]
    with open(path, "w", encoding="utf-8") as f:
        for conv in convs:
            msgs = [m for q, a in conv for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def make_init(directory, text, block_size=96, n_embd=64, seed=0):
    """A randomly initialised tiny GPT + a char tokenizer with the chat tokens, saved as a checkpoint."""
    tok = Tokenizer.train("char", [text])
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4, n_embd=n_embd,
                          pos="rope"))  # relative positions: answers do not depend on how much history precedes
    save_model(model, directory)
    tok.save(directory / "tokenizer")
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest (and far faster when other jobs share the two cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SFT (through the CLI) of a tiny model on 50 Q/A pairs, 40 English and 10 Chinese."""
    d = tmp_path_factory.mktemp("sft")
    pairs = make_pairs()
    data = write_conversations(d / "qa.jsonl", pairs)
    init = make_init(d / "init", "".join(q + a for q, a in pairs) + "/")
    run = d / "run"
    p = run_cli("sft", "--init", init, "--data", data, "--out", run, "--max_steps", 200, "--batch_size", 32,
                "--lr", 5e-3, "--min_lr", 1e-4, "--warmup_steps", 10, "--dtype", "fp32", "--device", "cpu",
                "--val_fraction", 0, "--eval_interval", 0, "--ckpt_interval", 0, "--log_interval", 50, env=ENV)
    return {"dir": d, "pairs": pairs, "data": data, "init": init, "run": run, "stdout": p.stdout, "stderr": p.stderr}


def test_sft_learns_the_answers_and_chat_replies_with_them(trained):
    run = trained["run"]
    assert (run / "ckpt" / "config.json").exists() and (run / "ckpt" / "tokenizer" / "tokenizer.json").exists()
    assert "50 conversations -> 50 examples" in trained["stderr"]
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.1 * losses[0]
    pairs = trained["pairs"]
    # one question per line; the model was trained on single-turn conversations, so /reset between them
    # (a scripted /reset prints nothing: still exactly one output line per question)
    questions = "".join(q + "\n/reset\n" for q, _ in pairs)
    p = run_cli("chat", "--ckpt", run / "ckpt", "--temperature", 0, "--max-new-tokens", 24, input=questions, env=ENV)
    replies = p.stdout.splitlines()
    assert len(replies) == len(pairs)  # one reply per line, nothing else on stdout
    right = [r == a for r, (_, a) in zip(replies, pairs)]
    assert sum(right) >= 0.95 * len(pairs), list(zip(replies, (a for _, a in pairs)))
    assert all(right[-10:]), "Chinese answers"  # Chinese in and out


def test_template_inference_then_reply_equals_training_rendering(trained):
    from pocketgpt.chat import stop_id
    from pocketgpt.checkpoint import load_checkpoint
    from pocketgpt.engine import generate

    model, tok = load_checkpoint(trained["run"] / "ckpt", device="cpu", chat=True)
    q, a = trained["pairs"][3]
    prompt, _ = render([{"role": "user", "content": q}], tok, add_generation_prompt=True)
    (res,) = generate(model, [prompt], max_new_tokens=24, temperature=0, stop_ids=[stop_id(tok)],
                      return_logprobs=True)
    assert res.finish_reason == "stop"  # the model closed its reply with <|end|> (the engine strips stop ids)
    reply = res.tokens + [stop_id(tok)]
    full, labels = render([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok)
    assert prompt + reply == full
    assert [t for t in labels if t != IGNORE] == reply


def test_chat_session_keeps_and_trims_history(trained):
    from pocketgpt.checkpoint import load_checkpoint

    model, tok = load_checkpoint(trained["run"] / "ckpt", device="cpu", chat=True)
    pairs = trained["pairs"]
    s = ChatSession(model, tok, temperature=0, max_new_tokens=16)
    assert s.reply_text(pairs[0][0]) == pairs[0][1]
    s.system = "/"
    s.messages.append({"role": "user", "content": "hi"})
    # the next prompt is the whole history, rendered by the template, ending in <|assistant|>
    assert s.prompt_ids() == render(s.conversation(), tok, add_generation_prompt=True)[0]
    assert [m["role"] for m in s.conversation()] == ["system", "user", "assistant", "user"]
    s.messages.pop()
    for q, _ in pairs[2:8]:  # far more than the 96-token context holds
        s.reply_text(q)
        assert len(render(s.conversation(), tok)[0]) <= 96 + 1
    conv = s.conversation()
    assert conv[0] == {"role": "system", "content": "/"}  # the system message survives trimming
    assert conv[-2]["content"] == pairs[7][0] and conv[-1]["role"] == "assistant"
    assert len(conv) < 1 + 2 * 8 and any("dropped" in n for n in s.notes)
    s.reset()
    assert s.conversation() == [{"role": "system", "content": "/"}]


def test_chat_in_a_pseudo_terminal(trained):
    import pexpect

    pairs = trained["pairs"]
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "pocketgpt", "chat", "--ckpt", str(trained["run"] / "ckpt"),
                                           "--temperature", "0", "--max-new-tokens", "16"],
                          env=env, encoding="utf-8", timeout=90)
    try:
        child.expect("you> ")
        child.sendline(pairs[0][0])
        child.expect_exact(f"bot> {pairs[0][1]}")
        child.expect("you> ")
        # a second turn, answered with the first one in its prompt (a model this tiny, trained on single-turn
        # conversations only, is not asked to answer it right; the history is what is checked)
        child.sendline(pairs[1][0])
        child.expect("bot> (.*)\r\n")
        second = child.match.group(1)
        child.expect("you> ")
        child.sendline("/history")
        child.expect_exact(f"[user] {pairs[0][0]}")
        child.expect_exact(f"[assistant] {pairs[0][1]}")
        child.expect_exact(f"[user] {pairs[1][0]}")
        child.expect_exact(f"[assistant] {second}")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect("you> ")
        child.sendline("/history")
        child.expect("empty conversation")
        child.expect("you> ")
        q, a = pairs[45]  # Chinese in and out through the terminal
        child.sendline(q)
        child.expect_exact(f"bot> {a}")
        child.expect("you> ")
        child.sendline("/history")
        child.expect_exact(f"[user] {q}")
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# --------------------------------------------------------------------------------------------------------------------
# the stage itself (in-process, tiny)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("char", ["".join(q + a for q, a in make_pairs())])


def test_stage_loss_is_mean_ce_over_assistant_tokens(tok):
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in make_pairs()[:6]]
    convs[0] = convs[0] + [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "it is"}]
    examples, stats = build_examples(convs, tok, 64)
    assert stats.examples == 6
    x, y = collate(examples, tok.pad_id)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    stage = SFTStage(examples, [], tok.pad_id, batch_size=6)
    loss, _ = stage.loss(model, (x, y))
    logits, _ = model(x)
    manual = []
    for i, (ids, labels) in enumerate(examples):
        for t in range(len(ids) - 1):
            if labels[t + 1] != IGNORE:
                manual.append(-torch.log_softmax(logits[i, t], -1)[labels[t + 1]])
    assert torch.allclose(loss, torch.stack(manual).mean(), atol=1e-5)
    # padding does not change a row: the padded batch gives the same logits as each example alone
    ids0 = torch.tensor([examples[0][0][:-1]])
    assert torch.allclose(model(ids0)[0][0], logits[0, : ids0.shape[1]], atol=1e-5)
    # the two replies of the two-turn conversation are both trained
    assert examples[0][1].count(tok.token_id("<|end|>")) == 2


def test_epochs_cover_every_example_once():
    for epoch in range(3):
        batches = epoch_batches(203, 16, seed=1, epoch=epoch)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(203))
        assert all(len(b) <= 16 for b in batches)
    assert epoch_batches(203, 16, 1, 0) != epoch_batches(203, 16, 1, 1)


def test_every_batch_mixes_sources_of_very_different_lengths(tok):
    """Short arithmetic-like and long chat-like conversations: each batch holds both (length-sorted batches held one
    kind only, and the training loss swung between the two sources from batch to batch)."""
    rng = random.Random(0)
    short = [[{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]] * 48
    long = [[{"role": "user", "content": q}, {"role": "assistant", "content": a * 3}] for q, a in make_pairs(48, 0)]
    convs = short + long
    rng.shuffle(convs)
    examples, _ = build_examples(convs, tok, 96)
    stage = SFTStage(examples, [], tok.pad_id, batch_size=16)
    cut = 20  # every short example has fewer real tokens, every long one more
    assert all((len(ids) < cut) == (c in short) for (ids, _), c in zip(examples, convs))
    for step in range(3 * 6):  # three epochs of 6 batches
        x, _ = stage.get_batch(step, 0)
        real = (x != tok.pad_id).sum(1)
        assert 0 < int((real < cut).sum()) < len(x), f"batch {step} holds one source only"


def test_resume_continues_the_run(tmp_path, tok):
    pairs = make_pairs(8, 2)
    data = write_conversations(tmp_path / "qa.jsonl", pairs)
    init = make_init(tmp_path / "init", "".join(q + a for q, a in pairs), n_embd=32)
    sft = SFTConfig(data=[str(data)], val_fraction=0.2)
    tc = dict(batch_size=4, lr=3e-3, min_lr=1e-4, warmup_steps=1, dtype="fp32", device="cpu", eval_interval=2,
              ckpt_interval=2, log_interval=1, progress=False)
    logs = []
    r1 = run_sft(init, tmp_path / "run", sft, TrainConfig(max_steps=4, **tc), log=logs.append)
    assert r1["step"] == 4 and math.isfinite(r1["val_loss"]) and "val_ppl" in r1
    assert any("held-out 2 conversations" in line for line in logs)
    r2 = run_sft(init, tmp_path / "run", sft, TrainConfig(max_steps=6, **tc), log=logs.append)
    assert r2["step"] == 6
    state = json.loads((tmp_path / "run" / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["stage"] == "sft"
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "best" / "tokenizer").is_dir()


def test_init_from_a_gpt2_directory_adds_the_chat_tokens(tmp_path):
    from pocketgpt.checkpoint import export_hf
    from pocketgpt.tokenizer import _bytes_to_unicode

    # a Hugging Face GPT-2 directory: weights + vocab.json/merges.txt that know only <|endoftext|>
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<|endoftext|>"] = len(vocab)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=64, n_layer=1, n_head=2, n_embd=32))
    hf_dir = tmp_path / "gpt2"
    export_hf(model, hf_dir, "gpt2")
    (hf_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (hf_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf_dir / f).unlink(missing_ok=True)
    data = write_conversations(tmp_path / "qa.jsonl", make_pairs(6, 2))
    logs = []
    run_sft(hf_dir, tmp_path / "run", SFTConfig(data=[str(data)], val_fraction=0),
            TrainConfig(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=1, dtype="fp32", device="cpu",
                        eval_interval=0, progress=False), log=logs.append)
    assert any("added chat tokens" in line for line in logs)
    tuned = load_model(tmp_path / "run" / "ckpt")
    tok = Tokenizer.load(tmp_path / "run" / "ckpt" / "tokenizer")
    assert tok.vocab_size == len(vocab) + 5 == tuned.config.vocab_size
    ids, _ = render([{"role": "user", "content": "hi 你好"}], tok, add_generation_prompt=True)
    assert max(ids) < tuned.config.vocab_size


# --------------------------------------------------------------------------------------------------------------------
# errors: one line, naming the file and line


def test_cli_errors_name_file_and_line(tmp_path, trained, capsys):
    from pocketgpt.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n" + '{"messages": [{"role": "narrator", "content": "x"}]}\n', encoding="utf-8")
    assert main(["sft", "--init", str(trained["init"]), "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"pocketgpt sft: error: {bad}:2: message 0 has unknown role 'narrator' (expected system, " \
                          "user or assistant)"
    assert not (tmp_path / "r" / "ckpt").exists()
    assert main(["sft", "--data", str(bad)]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["sft", "--init", str(trained["init"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    # a checkpoint whose tokenizer has no chat tokens cannot chat
    from pocketgpt.tokenizer import _bytes_to_unicode

    plain = tmp_path / "plain"
    save_model(GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16)), plain)
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    (plain / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (plain / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    assert main(["chat", "--ckpt", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "no chat tokens" in err and len(err.strip().splitlines()) == 1
