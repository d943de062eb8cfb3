"""prepare (text/JSONL → token shards) and TokenShards: counts, deterministic splits, no-op re-runs, bundled data,
and one clear error (with nothing written) for each kind of bad input."""

import gzip
import json

import numpy as np
import pytest
import torch

from pocketgpt import Tokenizer, UserError
from pocketgpt.checkpoint import save_model
from pocketgpt.cli import main as cli_main
from pocketgpt.data import TokenShards, builtin_path, prepare, shard_dtype, text_documents
from pocketgpt.records import BUILTINS
from pocketgpt.records import builtin_files


def _corpus(n=120):
    """n blank-line-separated paragraphs with messy whitespace; returns (text, cleaned documents)."""
    docs, parts = [], []
    for i in range(n):
        a, b = f"Speaker {i}: the quick brown fox {i * 7}.", f"Jumps  over\tthe lazy dog number {i}!"
        parts.append(f"  {a}\n\n\n" if i % 5 == 0 else f"{a}\n   \n{b}   ")  # blank lines inside are separators
        docs.extend([a] if i % 5 == 0 else [a, " ".join(b.split())])
    return "\n\n".join(parts) + "\n", docs


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    text, _ = _corpus()
    tok = Tokenizer.train("char", [text + "The 水浒传。！？你好…"])
    path = tmp_path_factory.mktemp("tok") / "char"
    tok.save(path)
    return path


def _shard_docs(out, split, tok):
    data = np.fromfile(out / f"{split}.bin", dtype=json.loads((out / "meta.json").read_text())["dtype"])
    text = tok.decode(data.tolist())
    assert not data.size or data[0] == tok.eos_id
    return [d for d in text.split("<|endoftext|>") if d]


def test_prepare_counts_docs_and_tokenizer_copy(tmp_path, char_tok):
    text, docs = _corpus()
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "in.txt"], tmp_path / "out", char_tok, val_fraction=0.1, test_fraction=0.1,
                   verbose=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "tokenizer", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    for split in ("train", "val", "test"):
        assert (out / f"{split}.bin").stat().st_size == meta["counts"][split] * 2  # uint16
    n_held = round(0.1 * len(docs))
    assert meta["dtype"] == "uint16" and meta["documents"] == {"train": len(docs) - 2 * n_held, "val": n_held,
                                                               "test": n_held}
    assert meta["sources"][0]["sha256"] and meta["sources"][0]["documents"] == len(docs)
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.fingerprint == Tokenizer.load(char_tok).fingerprint == meta["tokenizer"]["sha256"]
    got = {s: _shard_docs(out, s, tok) for s in ("train", "val", "test")}
    assert sorted(got["train"] + got["val"] + got["test"]) == sorted(docs)  # cleaned, nothing lost or repeated
    assert got["train"] == [d for d in docs if d in set(got["train"])]  # original order kept within a split
    assert shard_dtype(50257) == "uint16" and shard_dtype(65535) == "uint16" and shard_dtype(65536) == "uint32"


def test_split_is_deterministic_and_rerun_is_noop(tmp_path, char_tok, capsys):
    text, _ = _corpus()
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    a = prepare([tmp_path / "in.txt"], tmp_path / "a", char_tok, seed=1, verbose=False)
    b = prepare([tmp_path / "in.txt"], tmp_path / "b", char_tok, seed=1, verbose=False)
    c = prepare([tmp_path / "in.txt"], tmp_path / "c", char_tok, seed=2, verbose=False)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    assert a["counts"] == b["counts"]
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert c["counts"]["train"] + c["counts"]["val"] == a["counts"]["train"] + a["counts"]["val"]
    # same inputs again: nothing rewritten
    stamp = (tmp_path / "a" / "train.bin").stat().st_mtime_ns
    assert prepare([tmp_path / "in.txt"], tmp_path / "a", char_tok, seed=1) == a
    assert "nothing to do" in capsys.readouterr().err
    assert (tmp_path / "a" / "train.bin").stat().st_mtime_ns == stamp
    # changed input with the same tokenizer: prepared again
    (tmp_path / "in.txt").write_text(text + "\n\nOne more paragraph.\n", encoding="utf-8")
    assert prepare([tmp_path / "in.txt"], tmp_path / "a", char_tok, seed=1, verbose=False)["fingerprint"] != \
        a["fingerprint"]


def test_inputs_gz_jsonl_folders_and_sentence_split(tmp_path, char_tok):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    with gzip.open(folder / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Jumps over. The lazy dog!\nSpeaker 1\n")  # no blank line: each line a document
    (folder / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "水浒传。你好！ 你好？ the fox"}, ensure_ascii=False) + "\n\n"
        + json.dumps({"text": "dog", "other": 1}) + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored")
    meta = prepare([folder], tmp_path / "out", char_tok, val_fraction=0.0, split_sentences=True, verbose=False)
    assert [s["path"] for s in meta["sources"]] == [str(folder / "a.txt.gz"), str(folder / "sub" / "b.jsonl")]
    docs = _shard_docs(tmp_path / "out", "train", Tokenizer.load(char_tok))
    assert docs == ["Jumps over.\nThe lazy dog!", "Speaker 1", "水浒传。\n你好！\n你好？\nthe fox", "dog"]
    assert "val" in meta["counts"] and meta["counts"]["val"] == 0
    assert text_documents("a\nb\n\nc\n") == ["a\nb", "c"] and text_documents("a\r\nb\r\n") == ["a", "b"]


def test_token_shards_batches_and_eval_windows(tmp_path, char_tok):
    text, _ = _corpus()
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "in.txt"], tmp_path / "out", char_tok, verbose=False)
    data = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).astype(np.int64)
    shards = TokenShards(tmp_path / "out", "train", block_size=16)
    assert len(shards) == meta["counts"]["train"] == data.size and isinstance(shards.data, np.memmap)
    x, y = shards.get_batch(8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x.numpy():  # every row is a real window of the shard
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(data, 16) == row, axis=1))
        assert starts.size
    x2, _ = shards.get_batch(8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    windows = list(shards.iter_eval(5))
    n = (data.size - 1) // 16
    assert sum(len(b[0]) for b in windows) == n == shards.num_windows
    ex = torch.cat([b[0] for b in windows]).reshape(-1)
    ey = torch.cat([b[1] for b in windows]).reshape(-1)
    assert torch.equal(ex, torch.from_numpy(data[: n * 16])) and torch.equal(ey, torch.from_numpy(data[1: n * 16 + 1]))
    some = list(shards.iter_eval(5, max_batches=2))  # 10 windows spread over the whole split
    assert len(some) == 2 and all(len(b[0]) == 5 for b in some)
    rows = [r.tolist() for b in some for r in b[0]]
    starts = [i * n // 10 * 16 for i in range(10)]
    assert rows == [data[s:s + 16].tolist() for s in starts] and starts[-1] >= 0.9 * (n - 1) * 16 - 16
    val = TokenShards(tmp_path / "out", "val", block_size=8)
    assert len(val) == meta["counts"]["val"]


def test_token_shards_errors(tmp_path, char_tok):
    (tmp_path / "in.txt").write_text(_corpus()[0], encoding="utf-8")
    prepare([tmp_path / "in.txt"], tmp_path / "out", char_tok, verbose=False)
    with pytest.raises(UserError, match="no 'test' split"):
        TokenShards(tmp_path / "out", "test", 16)
    n = len(TokenShards(tmp_path / "out", "val", 4))
    with pytest.raises(UserError, match=f"val split has {n} tokens, fewer than block_size"):
        TokenShards(tmp_path / "out", "val", n)
    with pytest.raises(UserError, match="no meta.json"):
        TokenShards(tmp_path, "train", 16)


def test_builtin_corpora_and_cli(tmp_path, capsys):
    for name in BUILTINS:
        assert builtin_path(name).exists()
        assert builtin_files(name)
    # (their records through the live readers: test_records.py)
    assert [p.name for p in builtin_files("chat_zh")] == ["chatterbot_zh.jsonl", "kdconv.jsonl"]
    with pytest.raises(UserError, match="unknown corpus 'nope'"):
        builtin_path("nope")
    # the demo path: Tiny Shakespeare at character level, tokenizer trained on the fly
    assert cli_main(["prepare", "--builtin", "shakespeare", "--kind", "char", "--out", str(tmp_path / "ts")]) == 0
    meta = json.loads((tmp_path / "ts" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "char" and meta["vocab_size"] == 65 + 6 + 1
    assert meta["documents"]["val"] > 500 and 0.05 < meta["counts"]["val"] / meta["counts"]["train"] < 0.2
    # chat samples as a pretraining corpus (the messages are joined)
    assert cli_main(["prepare", "--builtin", "chat_zh", "--tokenizer", str(tmp_path / "ts"),
                     "--out", str(tmp_path / "zh"), "--val-fraction", "0.05"]) == 0
    capsys.readouterr()


def test_tail_raw_split_is_nanogpts_shakespeare_char_task(tmp_path, capsys):
    """nanoGPT's data/shakespeare_char/prepare.py: the raw text, first 90% of the characters train, last 10% val."""
    src = builtin_path("shakespeare")
    assert cli_main(["prepare", "--kind", "char", "--split", "tail", "--raw", "--out", str(tmp_path / "n"),
                     str(src)]) == 0
    meta = json.loads((tmp_path / "n" / "meta.json").read_text())
    assert meta["counts"] == {"train": 1_003_854, "val": 111_540}
    tok = Tokenizer.load(tmp_path / "n" / "tokenizer")
    text = src.read_text(encoding="utf-8")
    assert len(set(text)) == 65 and tok.vocab_size == 65 + len(tok.special_ids) + 1  # + <unk>
    got = {s: tok.decode(np.fromfile(tmp_path / "n" / f"{s}.bin", dtype=meta["dtype"]).tolist())
           for s in ("train", "val")}
    assert got["train"] == text[:1_003_854] and got["val"] == text[1_003_854:]  # byte-for-byte, no separators
    # not raw: the last documents (cleaned, each after <|endoftext|>) are val, in order
    meta = prepare([src], tmp_path / "docs", tmp_path / "n" / "tokenizer", split="tail", verbose=False)
    docs = text_documents(text)
    assert _shard_docs(tmp_path / "docs", "val", tok) == docs[-round(0.1 * len(docs)):]
    capsys.readouterr()
    assert "add --split tail" in _error(["prepare", "--raw", "--kind", "char", "--out", str(tmp_path / "r"),
                                         str(src)], capsys)
    assert not (tmp_path / "r").exists()


def _error(argv, capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines may come before the error
    assert err[-1].startswith("pocketgpt prepare: error: ") and "Traceback" not in "".join(err)
    return err[-1]


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, char_tok, capsys):
    tok = ["--tokenizer", str(char_tok)]
    out = tmp_path / "out"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Speaker fox\n\nthe lazy dög\n".encode("latin-1"))
    err = _error(["prepare", *tok, "--out", str(out), str(bad)], capsys)
    offset = len("Speaker fox\n\nthe lazy d")
    assert f"{bad}:3: not valid utf-8 text at byte {offset}" in err and "--errors replace" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert cli_main(["prepare", *tok, "--out", str(out), "--errors", "replace", "--val-fraction", "0", str(bad)]) == 0
    assert cli_main(["prepare", *tok, "--out", str(tmp_path / "l1"), "--encoding", "latin-1", "--val-fraction",
                     "0", str(bad)]) == 0
    capsys.readouterr()

    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n\u3000\n")
    assert "empty after cleaning" in _error(["prepare", *tok, "--out", str(tmp_path / "e"), str(empty)], capsys)

    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "fox"}\n{"text": "dog"\n')
    assert f"{lines}:2: not valid JSON" in _error(["prepare", *tok, "--out", str(tmp_path / "j"), str(lines)], capsys)
    lines.write_text('{"text": "fox"}\n\n{"body": "dog"}\n')
    assert f"{lines}:3: record has no field 'text'" in _error(
        ["prepare", *tok, "--out", str(tmp_path / "j"), str(lines)], capsys)
    assert not (tmp_path / "j").exists() and not (tmp_path / "e").exists()

    # out already holds shards of another tokenizer: refused, left untouched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    good = tmp_path / "good.txt"
    good.write_text(_corpus()[0])
    other = tmp_path / "other_tok"
    Tokenizer.train("char", [_corpus()[0]]).save(other)
    err = _error(["prepare", "--tokenizer", str(other), "--out", str(out), str(good)], capsys)
    assert f"{out}: holds shards made with another tokenizer" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert "not empty" in _error(["prepare", *tok, "--out", str(tmp_path / "mine"), str(good)], capsys)
    assert "missing.txt: no such file" in _error(["prepare", *tok, "--out", str(tmp_path / "m"),
                                                  str(tmp_path / "missing.txt")], capsys)
    assert "--vocab-size: 100" in _error(["prepare", "--vocab-size", "100", "--out", str(tmp_path / "v"), str(good)],
                                         capsys)
    assert not (tmp_path / "v").exists()


def test_a_model_and_data_of_different_tokenizers_are_refused(tmp_path, char_tok, capsys, monkeypatch):
    from pocketgpt import GPT, GPTConfig

    text, _ = _corpus()
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    prepare([tmp_path / "in.txt"], tmp_path / "a", char_tok, verbose=False)
    Tokenizer.train("char", [text + "ÆØÅ"]).save(tmp_path / "other")  # another vocabulary
    prepare([tmp_path / "in.txt"], tmp_path / "b", tmp_path / "other", verbose=False)
    tok = Tokenizer.load(char_tok)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)),
               tmp_path / "m")
    tok.save(tmp_path / "m" / "tokenizer")

    def error(argv) -> str:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "uses another tokenizer" in err and str(tmp_path / "b") in err, err
        return err

    assert cli_main(["eval", "--ckpt", str(tmp_path / "m"), "--data", str(tmp_path / "a")]) == 0
    assert "val loss" in capsys.readouterr().out
    assert error(["eval", "--ckpt", str(tmp_path / "m"), "--data", str(tmp_path / "b")]).endswith(
        f"prepare the data with --tokenizer {tmp_path / 'm'}")
    run = ["pretrain", "--config", "tiny", "--max_steps", "1", "--eval_interval", "0", "--block_size", "16",
           "--batch_size", "2", "--out", str(tmp_path / "run"), "--progress", "false"]
    error([*run, "--dir", str(tmp_path / "b"), "--init", str(tmp_path / "m")])
    assert cli_main([*run, "--dir", str(tmp_path / "a")]) == 0  # a run on data a, then the same --out on data b
    capsys.readouterr()
    assert error([*run, "--dir", str(tmp_path / "b")]).endswith("start over with --restart, or choose another --out")
