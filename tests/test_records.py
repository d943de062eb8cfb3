"""pocketgpt.records: every reader (file:line errors, skip_bad, folders, bundled corpora), the one seeded split, the
one truncation rule and the right-padding helper."""

import gzip
import json

import pytest
import torch

from pocketgpt.errors import UserError
from pocketgpt.records import (builtin_files, fit, pad, read, read_conversations, read_pairs, read_prompts, resolve,
                               split)


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
    # every bundled chat file parses with no bad line: one conversation per non-blank line, each ending in a reply
    for name, script in (("chat_en", "the"), ("chat_zh", "你")):
        for f in builtin_files(name):
            convs = read_conversations(f)
            with gzip.open(f, "rt", encoding="utf-8") if f.name.endswith(".gz") else open(f, encoding="utf-8") as fh:
                assert len(convs) == sum(1 for line in fh if line.strip()) >= 50, f
            assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in convs), f
            assert any(script in m["content"] for c in convs for m in c), f


def test_bundled_corpora_through_the_live_readers():
    convs = read_conversations("chat")  # a bundled folder: every file of it, in order
    assert len(convs) == sum(1 for f in builtin_files("chat") for _ in read(f))
    for conv in convs:
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
    pairs = read_pairs("prefs")
    assert len(pairs) == 300 and all(p.chosen != p.rejected and p.prompt[-1]["role"] == "user" for p in pairs)
    assert pairs[0].where.endswith("hh_rlhf_harmless.jsonl.gz:1")
    prompts, where = read_prompts("chat_en")  # SFT conversations as RL prompts: up to their last user turn
    assert all(p[-1]["role"] == "user" for p in prompts) and len(where) == len(prompts)
    with pytest.raises(UserError, match="nope: no such file, nor a bundled corpus"):
        resolve("nope")


def test_conversation_and_preference_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(GOOD + '\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(UserError, match=r"c.jsonl:2: message 0 has unknown role 'bot'"):
        read_conversations([f])
    f.write_text('{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a"}\n')
    with pytest.raises(UserError, match="c.jsonl:1: missing 'rejected'"):
        read_pairs([f])
    f.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')  # pairs take a message list, prompts text too
    with pytest.raises(UserError, match="c.jsonl:1: 'prompt' must be a list of messages"):
        read_pairs(f)
    assert read_prompts(f) == ([[{"role": "user", "content": "hi"}]], [f"{f}:1"])
    f.write_bytes(GOOD.encode() + b"\n" + '{"messages": "d\u00f6g"}'.encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=f"c.jsonl:2: not valid utf-8 text at byte {len(GOOD) + 16}"):
        read_conversations(f)
    folder = tmp_path / "folder"
    folder.mkdir()
    _write(folder / "b.jsonl", [GOOD])
    (folder / "a.jsonl.gz").write_bytes(gzip.compress((GOOD + "\n").encode()))
    (folder / "notes.txt").write_text("not read")
    assert len(read_conversations(folder)) == 2  # a folder: its .jsonl / .jsonl.gz files
    with pytest.raises(UserError, match="--data: no preference pairs given"):
        read_pairs([])


def test_one_seeded_split():
    items = list(range(100))
    train, held = split(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and train == sorted(train) and held == sorted(held)
    assert split(items, 0.1, seed=3) == (train, held) and split(items, 0.1, seed=4)[1] != held
    assert set(split(items, 0.2, seed=3)[1]) >= set(held)  # a larger held-out set contains a smaller one
    assert split(items, 0.1, seed=3, most=4)[1] == split(items, seed=3, count=4)[1]
    assert len(split(items, 0.5, seed=3, most=4)[1]) == 4
    assert split([1, 2], 0.01)[1] != [] and split([1], 0.5) == ([1], [])  # >= 1 held out of two, >= 1 kept
    assert split(items, 0.0) == (items, []) and len(split(items, seed=0, count=500)[0]) == 1


def test_one_truncation_rule():
    p, r = list(range(10)), [100, 101, 102]
    assert fit(p, 20, r) == (p, r)  # fits: untouched
    assert fit(p, 8, r) == ([5, 6, 7, 8, 9], r)  # the prompt loses its oldest tokens, the reply is whole
    assert fit(p, 4, r) == ([8, 9], [100, 101])  # the prompt needs the context: the reply keeps half, its start
    assert fit(p, 4, r, [7]) == ([8, 9], [100, 101], [7])  # two replies share one prompt (DPO)
    assert fit([1, 2, 3, 4], 4, [5] * 10) == ([3, 4], [5, 5])  # a reply alone too long: half the context each
    assert fit(p, 6, 4) == ([8, 9], 4)  # room for a reply still to be written
    assert fit(p, 6) == (p[-6:],)


def test_pad_right():
    x = pad([[1, 2, 3], [4], []], -1)
    assert x.dtype == torch.long and x.tolist() == [[1, 2, 3], [4, -1, -1], [-1, -1, -1]]
    assert pad([[]], 0).shape == (1, 1) and pad([[1]], 0, width=3).tolist() == [[1, 0, 0]]
