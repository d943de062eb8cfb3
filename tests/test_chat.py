"""The chat template (mask, training == inference rendering), conversation files, context fitting, chat session."""

import gzip
import json

import pytest

from pocketgpt.chat import IGNORE, FitStats, fit_to_context, read_conversations, render
from pocketgpt.errors import UserError
from pocketgpt.tokenizer import Tokenizer

TEXT = "hello there, how are you? I am fine. what is two plus two? four. 你好吗？我很好。 system rules"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("bpe", [TEXT * 3], vocab_size=300)


TWO_TURNS = [
    {"role": "system", "content": "system rules"},
    {"role": "user", "content": "hello there, how are you?"},
    {"role": "assistant", "content": "I am fine."},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four. 你好"},
]


def test_mask_exactly_assistant_tokens_and_their_end(tok):
    ids, labels = render(TWO_TURNS, tok)
    assert len(ids) == len(labels)
    sp = tok.special_ids
    end, asst = sp["<|end|>"], sp["<|assistant|>"]
    # expected labelled positions: after each <|assistant|>, up to and including the <|end|> that closes the turn
    expected = set()
    for i, t in enumerate(ids):
        if t == asst:
            j = i + 1
            while ids[j] != end:
                expected.add(j)
                j += 1
            expected.add(j)
    labelled = {i for i, lab in enumerate(labels) if lab != IGNORE}
    assert labelled == expected
    assert all(labels[i] == ids[i] for i in labelled)
    # the labelled tokens decode to exactly the two replies, each closed by <|end|>
    spans, cur = [], []
    for i in sorted(labelled):
        cur.append(ids[i])
        if ids[i] == end:
            spans.append(tok.decode(cur[:-1]))
            cur = []
    assert spans == ["I am fine.", "four. 你好"]
    # layout: <|endoftext|> first, then <|system|>, and no special token leaks from plain content
    assert ids[0] == sp["<|endoftext|>"] and ids[1] == sp["<|system|>"]
    assert sum(t in sp.values() for t in ids) == 1 + 5 * 2


def test_inference_rendering_plus_reply_equals_training_rendering(tok):
    prompt = TWO_TURNS[:4]
    reply = TWO_TURNS[4]["content"]
    p_ids, p_labels = render(prompt, tok, add_generation_prompt=True)
    assert p_ids[-1] == tok.token_id("<|assistant|>") and p_labels[-1] == IGNORE
    # what the model writes: the reply tokens, closed by the stop token <|end|>
    generated = tok.encode(reply) + [tok.token_id("<|end|>")]
    full_ids, full_labels = render(TWO_TURNS, tok)
    assert p_ids + generated == full_ids
    assert full_labels == p_labels + generated


def test_literal_special_strings_in_content_are_text(tok):
    ids, _ = render([{"role": "user", "content": "<|end|><|assistant|>"}, {"role": "assistant", "content": "x"}], tok)
    assert ids.count(tok.token_id("<|end|>")) == 2


def test_render_rejects_bad_messages(tok):
    with pytest.raises(UserError, match="unknown role 'bot'"):
        render([{"role": "bot", "content": "hi"}], tok)
    with pytest.raises(UserError, match="content"):
        render([{"role": "user", "content": 3}], tok)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"id": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"messages": [', "not valid JSON"),
        ('{"text": "hi"}', "missing 'messages'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    f = _write(tmp_path / "c.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(UserError, match=message) as e:
        read_conversations(f)
    assert str(e.value).startswith(f"{f}:3:")
    assert "\n" not in str(e.value)
    # skip_bad: the good conversations survive and the skipped count is reported
    reports = []
    convs = read_conversations(f, skip_bad=True, report=reports.append)
    assert len(convs) == 2 and len(reports) == 1 and "skipped 1 bad line" in reports[0]


def test_empty_file_and_gzip(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserError, match="no conversations"):
        read_conversations(empty)
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress((GOOD + "\n" + GOOD + "\n").encode()))
    convs = read_conversations(gz)
    assert convs[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_bundled_corpora_parse():
    from pocketgpt.data import builtin_files

    # every bundled chat file parses with no bad line: one conversation per non-blank line, each ending in a reply
    for name, script in (("chat_en", "the"), ("chat_zh", "你")):
        for f in builtin_files(name):
            convs = read_conversations(f)
            with gzip.open(f, "rt", encoding="utf-8") if f.name.endswith(".gz") else open(f, encoding="utf-8") as fh:
                assert len(convs) == sum(1 for line in fh if line.strip()) >= 50, f
            assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in convs), f
            assert any(script in m["content"] for c in convs for m in c), f


def test_fit_to_context_splits_at_turn_boundaries(tok):
    long_conv = [{"role": "system", "content": "system rules"}]
    for k in range(6):
        long_conv += [{"role": "user", "content": f"what is two plus two? {k}"},
                      {"role": "assistant", "content": f"four. {k}"}]
    full, _ = render(long_conv, tok)
    stats = FitStats()
    assert fit_to_context(long_conv, tok, len(full), stats=stats) == [render(long_conv, tok)]
    stats = FitStats()
    examples = fit_to_context(long_conv, tok, len(full) // 2, stats=stats)
    assert len(examples) >= 2 and stats.split == 1 and stats.truncated == 0
    head, _ = render(long_conv[:1], tok)
    n_replies = 0
    for ids, labels in examples:
        assert len(ids) <= len(full) // 2
        assert ids[: len(head)] == head  # every piece starts with the system prompt
        assert ids[len(head)] == tok.token_id("<|user|>") and ids[-1] == tok.token_id("<|end|>")
        n_replies += labels.count(tok.token_id("<|end|>"))
    assert n_replies == 6  # every reply trained exactly once
    stats = FitStats()
    one = fit_to_context(long_conv, tok, len(full) // 2, mode="truncate", stats=stats)
    assert len(one) == 1 and one[0] == examples[0] and stats.truncated == 1
    # not even the prompt fits: skipped and counted
    stats = FitStats()
    assert fit_to_context(long_conv, tok, len(head) + 3, stats=stats) == [] and stats.skipped == 1


def test_chat_defaults_are_one_constant_with_a_mild_repetition_penalty(tok):
    import argparse

    import torch

    from conftest import tiny_config
    from pocketgpt import GPT
    from pocketgpt.chat import CHAT_DEFAULTS, ChatSession, configure_cli, stop_id
    from pocketgpt.engine import stream_generate

    assert 1 < CHAT_DEFAULTS["repetition_penalty"] <= 1.3
    parser = argparse.ArgumentParser()
    configure_cli("chat", parser)
    args = vars(parser.parse_args(["--ckpt", "x"]))
    assert {k: args[k] for k in CHAT_DEFAULTS} == CHAT_DEFAULTS  # the CLI's defaults are the constant
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=128, tie_embeddings=False)).eval()
    session = ChatSession(model, tok, temperature=0, max_new_tokens=40)
    got = session.reply_text("what is two plus two?")
    ids, _ = render([{"role": "user", "content": "what is two plus two?"}], tok, add_generation_prompt=True)

    def engine(penalty):
        return "".join(stream_generate(model, tok, ids, max_new_tokens=40, temperature=0, stop_ids=[stop_id(tok)],
                                       repetition_penalty=penalty))

    assert got == engine(CHAT_DEFAULTS["repetition_penalty"]) != engine(1.0) and "\ufffd" not in got
