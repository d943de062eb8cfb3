"""Tokenizers: lossless round trips, special tokens only on request, save/load, GPT-2 file parity, clear errors."""

import json

import pytest

from pocketgpt import Tokenizer, UserError
from pocketgpt.cli import main as cli_main
from pocketgpt.data import builtin_path, read_text_file
from pocketgpt.tokenizer import SPECIAL_TOKENS, load_tokenizer_for

SHAKESPEARE = read_text_file(builtin_path("shakespeare"))[:60_000]
SHUIHU = read_text_file(builtin_path("shuihu"))[:20_000]
MIXED = ("Hello, world!  Two  spaces,\ttabs\r\nand CRLF. 你好，世界！《水浒传》第一回。 Emoji: 🎉🚀 👩‍👩‍👧 é ß Ω "
         "控制\x00\x01\x1b[0m\x7f end\n\n\n 1234567890 ")
PLAIN_SPECIALS = "say <|user|> or <|endoftext|> and <|end|><|assistant|>"


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("bpe", [SHAKESPEARE, SHUIHU], 800)


@pytest.fixture(scope="module")
def trained(bpe):
    return {
        "bpe": bpe,
        "char": Tokenizer.train("char", [SHAKESPEARE]),
        "word": Tokenizer.train("word", [SHAKESPEARE], 20_000),
        "unigram": Tokenizer.train("unigram", [SHAKESPEARE[:30_000], SHUIHU[:10_000]], 3000),
    }


def test_bpe_round_trips_any_text(bpe):
    for text in [SHAKESPEARE[:5000], SHUIHU[:3000], MIXED, "🎉", "\x00", "", " ", "\n\n", "a" * 1000]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert all(0 <= i < bpe.vocab_size for i in ids)
    # BPE learned merges: Chinese and English compress below one token per UTF-8 byte
    assert len(bpe.encode(SHUIHU[:3000])) < 0.6 * len(SHUIHU[:3000].encode())
    assert len(bpe.encode(SHAKESPEARE[:3000])) < 0.6 * len(SHAKESPEARE[:3000])


def test_decode_bytes_is_streamable(bpe):
    ids = bpe.encode("水浒传🎉 ok")
    whole = bpe.decode_bytes(ids)
    assert whole == "水浒传🎉 ok".encode()
    assert b"".join(bpe.decode_bytes([i]) for i in ids) == whole
    # some single byte-level token holds an incomplete UTF-8 sequence, which decode_bytes keeps intact
    assert any(_incomplete(bpe.decode_bytes([i])) for i in bpe.encode("🎉"))
    import torch

    assert bpe.decode(torch.tensor(ids)) == "水浒传🎉 ok"
    assert bpe.decode(bpe.encode("ok") + [bpe.vocab_size + 3, -1]) == "ok\ufffd\ufffd"  # e.g. padded model vocab


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("kind", ["char", "word", "unigram"])
def test_round_trip_on_training_text(trained, kind):
    tok = trained[kind]
    text = SHAKESPEARE if kind != "unigram" else SHAKESPEARE[:30_000] + SHUIHU[:10_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.decode_bytes(ids[i:i + 7]) for i in range(0, len(ids), 7)) == text.encode()
    if kind == "char":
        assert tok.vocab_size == len(set(SHAKESPEARE)) + len(SPECIAL_TOKENS) + 1  # + <unk>
        assert len(ids) == len(text)
    if kind == "word":
        assert len(ids) < len(text) / 3


def test_unknown_characters_map_to_unk(trained):
    char = trained["char"]
    ids = char.encode("a水b")
    assert len(ids) == 3 and ids[1] == char.token_id("<unk>")
    assert char.decode(ids) == "a<unk>b"


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "unigram"])
def test_special_tokens_only_on_request(trained, kind):
    tok = trained[kind]
    sp = tok.special_ids
    assert list(sp) == SPECIAL_TOKENS and len(set(sp.values())) == len(SPECIAL_TOKENS)
    assert all(0 <= i < tok.vocab_size for i in sp.values())
    plain = tok.encode(PLAIN_SPECIALS)
    assert not set(plain) & set(sp.values())
    assert not any(set(ids) & set(sp.values()) for ids in tok.encode_batch([PLAIN_SPECIALS, MIXED, SHAKESPEARE]))
    if kind == "bpe":
        assert tok.decode(plain) == PLAIN_SPECIALS
    for name, i in sp.items():
        assert tok.encode(name, allow_special=True) == [i]
        assert tok.token_id(name) == i
        assert tok.decode([i]) == name
    asked = tok.encode(PLAIN_SPECIALS, allow_special=True)
    assert [i for i in asked if i in sp.values()] == [sp[n] for n in
                                                      ["<|user|>", "<|endoftext|>", "<|end|>", "<|assistant|>"]]
    assert tok.decode(asked, skip_special=True).count("<|") == 0
    assert tok.eos_id == sp["<|endoftext|>"] and tok.pad_id == sp["<|pad|>"]


def test_encode_batch_matches_encode(bpe):
    texts = [SHAKESPEARE[i:i + 300] for i in range(0, 6000, 300)] + [MIXED, ""]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_fast_bpe_core_matches_hugging_face(bpe, monkeypatch):
    """Byte-level BPE encodes through tiktoken's core when available; it must give the HF model's ids exactly."""
    assert bpe._tt is not None
    monkeypatch.setenv("POCKETGPT_TOKENIZER_BACKEND", "hf")
    slow = Tokenizer(bpe._hf, "bpe")
    assert slow._tt is None
    texts = [MIXED, PLAIN_SPECIALS, SHAKESPEARE, SHUIHU, read_text_file(builtin_path("shuihu"))[-20_000:],
             " \n\n  x  \t", "'s 'll 'LL don't 1234 ½ ⅷ", "🎉" * 50]
    assert bpe.encode_batch(texts) == slow.encode_batch(texts) == [slow.encode(t) for t in texts]
    assert [bpe.encode(t, allow_special=True) for t in texts] == [slow.encode(t, allow_special=True) for t in texts]
    many = SHAKESPEARE.split("\n") * 3  # enough text for the threaded path
    assert bpe.encode_batch(many) == slow.encode_batch(many)


def test_fast_char_path_matches_hugging_face(trained, monkeypatch):
    char = trained["char"]
    assert char._chars is not None
    monkeypatch.setenv("POCKETGPT_TOKENIZER_BACKEND", "hf")
    slow = Tokenizer(char._hf, "char")
    texts = [SHAKESPEARE, MIXED, PLAIN_SPECIALS, "", "<unk>x"]
    assert char.encode_batch(texts) == slow.encode_batch(texts)
    assert [char.encode(t, allow_special=True) for t in texts] == [slow.encode(t, allow_special=True) for t in texts]


def test_save_load_round_trip(tmp_path, trained):
    for kind, tok in trained.items():
        tok.save(tmp_path / kind)
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["pocketgpt_tokenizer.json", "tokenizer.json"]
        back = Tokenizer.load(tmp_path / kind)
        assert back.kind == kind and back.vocab_size == tok.vocab_size and back.special_ids == tok.special_ids
        assert back.fingerprint == tok.fingerprint
        assert back.encode(MIXED) == tok.encode(MIXED)
        assert back.encode(PLAIN_SPECIALS) == tok.encode(PLAIN_SPECIALS)
    # the saved tokenizer.json is a standard Hugging Face file
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json"))
    assert hf.encode(MIXED, add_special_tokens=False) == trained["bpe"].encode(MIXED)


def _write_gpt2_files(tok: Tokenizer, directory):
    """vocab.json + merges.txt in GPT-2's format, from a byte-level BPE trained here."""
    model = json.loads(tok._hf.to_str())["model"]
    vocab = {t: i for t, i in model["vocab"].items() if t not in SPECIAL_TOKENS}
    vocab = {t: n for n, t in enumerate(sorted(vocab, key=vocab.get))}  # ids 0.. without our specials
    vocab["<|endoftext|>"] = len(vocab)  # GPT-2 keeps it last
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges


def test_gpt2_files_match_transformers(tmp_path, bpe):
    from transformers import GPT2TokenizerFast

    vocab, merges = _write_gpt2_files(bpe, tmp_path / "gpt2")
    ref = GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    ours = Tokenizer.load(tmp_path / "gpt2")
    assert ours.kind == "gpt2"
    assert ours.vocab_size == len(vocab) == len(ref)
    texts = [MIXED, SHAKESPEARE[:3000], SHUIHU[:1000], "  leading spaces and trailing  ", "🎉🎉🎉 ok"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text[:40]
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("a<|endoftext|>b", allow_special=True) == ref.encode("a<|endoftext|>b")
    assert ours.special_ids == {"<|endoftext|>": len(vocab) - 1}

    # the same through a tokenizer.json written by transformers, found by load_tokenizer_for in an HF model dir
    ref.save_pretrained(tmp_path / "hfmodel")
    (tmp_path / "hfmodel" / "config.json").write_text("{}")
    hf_dir = load_tokenizer_for(tmp_path / "hfmodel")
    assert [hf_dir.encode(t) for t in texts] == [ref.encode(t) for t in texts]

    # chat specials appended after the existing vocabulary, old ids unchanged
    n = ours.vocab_size
    added = ours.add_special_tokens()
    assert added == [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]
    assert ours.vocab_size == n + len(added)
    assert sorted(ours.token_id(t) for t in added) == list(range(n, n + len(added)))
    assert ours.encode(MIXED) == ref.encode(MIXED)
    assert ours.encode("<|user|>hi<|end|>", allow_special=True)[0] == ours.token_id("<|user|>")
    assert not set(ours.encode(PLAIN_SPECIALS)) & set(ours.special_ids.values())
    assert ours.add_special_tokens() == []
    ours.save(tmp_path / "gpt2chat")
    assert Tokenizer.load(tmp_path / "gpt2chat").special_ids == ours.special_ids


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "empty")
    with pytest.raises(UserError, match="no tokenizer found"):
        load_tokenizer_for(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "bad")


def test_vocab_size_errors():
    with pytest.raises(UserError, match=r"--vocab-size: 100 .*minimum 262"):
        Tokenizer.train("bpe", ["hello world"], 100)
    with pytest.raises(UserError, match=r"--vocab-size: 5 .*minimum 14"):
        Tokenizer.train("char", ["abcdefg"], 5)
    with pytest.raises(UserError, match=r"--vocab-size: 20 .*distinct characters"):
        Tokenizer.train("unigram", [SHUIHU[:500]], 20)
    with pytest.raises(UserError, match="--vocab-size: 3"):
        Tokenizer.train("word", ["hello world"], 3)
    with pytest.raises(UserError, match="--kind"):
        Tokenizer.train("wordpiece", ["hello"], 300)
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train("bpe", ["", "  \n"], 300)


def test_cli_train_and_encode(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text(SHAKESPEARE[:20_000], encoding="utf-8")
    assert cli_main(["tokenizer", "train", "--kind", "char", "--out", str(tmp_path / "tok"), str(src)]) == 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.kind == "char" and tok.decode(tok.encode("First Citizen")) == "First Citizen"
    assert cli_main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "<|user|>Fir"]) == 0
    out = capsys.readouterr().out
    assert str(tok.encode("<|user|>Fir")) in out
    assert cli_main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "50", "--out",
                     str(tmp_path / "tok2"), str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pocketgpt tokenizer: error: --vocab-size") and "\n" not in err
    assert not (tmp_path / "tok2").exists()
    (tmp_path / "notes.txt").write_text("keep me")  # --out pointing at a folder of other things: refused
    assert cli_main(["tokenizer", "train", "--kind", "char", "--out", str(tmp_path), str(src)]) == 2
    assert "holds other files" in capsys.readouterr().err and (tmp_path / "notes.txt").exists()


def test_a_vocabulary_smaller_than_asked_is_a_warning_with_its_reason(tmp_path, capsys):
    src = tmp_path / "small.txt"
    src.write_text(SHAKESPEARE[:3000], encoding="utf-8")
    with pytest.warns(UserWarning, match=r"ids, not the 2000 asked for: no pair of adjacent tokens"):
        Tokenizer.train("bpe", [src], 2000)
    assert cli_main(["tokenizer", "train", "--vocab-size", "2000", "--out", str(tmp_path / "tok"), str(src)]) == 0
    err = capsys.readouterr().err.strip()
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size < 2000
    assert err == (f"pocketgpt: warning: vocabulary has {tok.vocab_size} ids, not the 2000 asked for: no pair of "
                   "adjacent tokens is left to merge (every word of the corpus is one token already); a larger "
                   "corpus gives more")
