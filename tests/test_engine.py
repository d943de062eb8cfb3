"""The generation engine: cache parity, batching, sampling filters, beams vs transformers, streaming, stops, logprobs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.generation import logits_process as lp

from conftest import run_cli, tiny_config
from pocketgpt import GPT, UserError
from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.engine import (GenerationResult, SamplingParams, generate, min_p_filter, pack_replies, score,
                              token_logprobs, top_k_filter, top_p_filter)
from pocketgpt.fastdecode import Decoder, RowsLinear


def stream(model, tok, prompt, **kw):
    return list(generate(model, [prompt], tokenizer=tok, stream=True, **kw))


class ByteTokenizer:
    """Stand-in tokenizer: ids 0..255 are bytes, ids >= 256 are multi-byte pieces (see ``extra``)."""

    def __init__(self, extra=()):
        self.extra = [e.encode() if isinstance(e, str) else e for e in extra]
        self.vocab_size = 256 + len(self.extra)
        self.special_ids = {}

    def decode_bytes(self, ids):
        return b"".join(bytes([i]) if i < 256 else self.extra[i - 256] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode("utf-8"))


class ScriptedGPT(GPT):
    """A real GPT (cache, padding, positions all exercised) whose next token is forced to follow ``script``."""

    script: list[int] = []
    prompt_len = 0

    def forward(self, idx, targets=None, **kw):
        cache = kw.get("kv_cache")
        logits, loss = super().forward(idx, targets, **kw)
        k = cache.pos - self.prompt_len  # tokens generated before this prediction
        forced = torch.full_like(logits[:, -1], -30.0)
        forced[:, self.script[min(k, len(self.script) - 1)]] = 30.0
        logits = logits.clone()
        logits[:, -1] = forced
        return logits, loss


def scripted(text_or_ids, prompt, vocab=300, **kw):
    torch.manual_seed(0)
    m = ScriptedGPT(tiny_config(vocab_size=vocab, block_size=128, **kw)).eval()
    m.script = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else list(text_or_ids)
    m.prompt_len = len(prompt)
    return m


def recompute_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


KINDS = [dict(pos="learned"), dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
         dict(pos="sinusoidal", mlp="relu")]


@pytest.mark.parametrize("kw", KINDS, ids=lambda k: k["pos"])
def test_cached_greedy_equals_recompute_and_batched_equals_alone(kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=64, **kw)).eval()
    for p in model.parameters():  # peaky distributions: no near-ties in argmax
        p.data.mul_(4.0)
    prompts = [torch.randint(0, 97, (L,)).tolist() for L in (5, 1, 9)]
    alone = [generate(model, [p], max_new_tokens=10, temperature=0) for p in prompts]
    for p, (out,) in zip(prompts, alone):
        assert out == recompute_greedy(model, p, 10)
    batched = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert batched == [a[0] for a in alone]
    # n greedy samples per prompt share one prefill and are prompt-major
    assert generate(model, prompts, max_new_tokens=10, temperature=0, n=2) == [a[0] for a in alone for _ in (0, 1)]


def test_logprobs_match_forward_and_score():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    res = generate(model, prompts, max_new_tokens=8, top_k=20, seed=3, return_logprobs=True)
    assert all(isinstance(r, GenerationResult) and r.finish_reason == "length" for r in res)
    for p, r in zip(prompts, res):
        full = torch.tensor([p + r.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(full)[0][0, :-1].float(), -1)
        direct = logp[len(p) - 1 :].gather(-1, torch.tensor(r.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r.logprobs), direct, atol=1e-4, rtol=1e-4)
    # score of whole sequences (the first token as prompt): batched (padding-aware) == one at a time
    seqs = [p + r.tokens for p, r in zip(prompts, res)]
    both = score(model, [s[:1] for s in seqs], [s[1:] for s in seqs])
    for s, lp in zip(seqs, both):
        assert len(lp) == len(s) - 1
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(score(model, [s[:1]], [s[1:]])[0]), atol=1e-5, rtol=0)
    comp = score(model, prompts, [r.tokens for r in res])
    for c, r in zip(comp, res):
        torch.testing.assert_close(torch.tensor(c), torch.tensor(r.logprobs), atol=1e-4, rtol=1e-4)
    # return_argmax: the most likely token at each reply position, from the same forward
    with torch.no_grad():
        *_, best = token_logprobs(model, *pack_replies(prompts, [r.tokens for r in res]), return_argmax=True)
        for p, r, row in zip(prompts, res, best):
            want = model(torch.tensor([p + r.tokens]))[0][0, len(p) - 1 : -1].argmax(-1)
            assert row[: len(r.tokens)].tolist() == want.tolist()


def test_seeds_reproduce_and_n_samples_differ():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    a = generate(model, [[1, 2, 3]], max_new_tokens=16, seed=7, n=4)
    b = generate(model, [[1, 2, 3]], max_new_tokens=16, seed=7, n=4)
    c = generate(model, [[1, 2, 3]], max_new_tokens=16, seed=8, n=4)
    assert a == b and a != c
    assert len(a) == 4 and all(len(x) == 16 for x in a)
    assert len({tuple(x) for x in a}) > 1  # the n samples are different draws
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=16, temperature=0)
    assert generate(model, [[1, 2, 3]], max_new_tokens=16, top_k=1, seed=1) == greedy


def test_sampling_draws_tokens_with_the_model_probabilities():
    from pocketgpt.engine import _Sampler

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20000, -1)  # 20000 independent rows, one draw each
    for temperature, top_k in ((1.0, None), (0.5, 2)):
        sampler = _Sampler(5, "cpu")
        sampler.add([[0]], SamplingParams(temperature=temperature, top_k=top_k, n=20000, seed=0))
        draws = sampler(logits)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        want = (probs.log() / temperature).softmax(-1)
        if top_k:
            want[top_k:] = 0
            want /= want.sum()
        assert freq[4] == 0  # a zero-probability token is never drawn
        torch.testing.assert_close(freq, want, atol=0.015, rtol=0)  # ~4 standard errors


def test_filters_equal_transformers_warpers():
    torch.manual_seed(0)
    for _ in range(5):
        logits = torch.randn(4, 200) * 3
        ids = torch.zeros(4, 1, dtype=torch.long)
        for k in (1, 5, 50):
            assert torch.equal(top_k_filter(logits, k), lp.TopKLogitsWarper(k)(ids, logits.clone()))
        for p in (0.1, 0.5, 0.9, 0.99):
            assert torch.equal(top_p_filter(logits, p), lp.TopPLogitsWarper(p)(ids, logits.clone()))
        for m in (0.05, 0.3):
            assert torch.equal(min_p_filter(logits, m), lp.MinPLogitsWarper(m)(ids, logits.clone()))


def test_penalties_change_greedy_as_intended():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=40)).eval()
    out = generate(model, [[1, 2]], max_new_tokens=30, temperature=0, frequency_penalty=100.0)[0]
    assert len(set(out)) == len(out)  # a huge frequency penalty forbids any repeat of a generated token
    out = generate(model, [[1, 2]], max_new_tokens=30, temperature=0, repetition_penalty=1e6)[0]
    assert not ({1, 2} & set(out[:30]))  # prompt tokens are penalised too


def test_stop_ids_and_stop_strings_cut_exactly():
    tok = ByteTokenizer(extra=["c S"])
    prompt = [104, 105]
    # "ab" + "c S" + "TOP rest": the stop string starts inside a multi-byte token
    script = list(b"ab") + [256] + list(b"TOP rest") + [10]
    model = scripted(script, prompt)
    (r,) = generate(model, [prompt], max_new_tokens=20, temperature=0, stop=["STOP"], tokenizer=tok,
                    return_logprobs=True)
    assert r.text == "abc " and r.finish_reason == "stop"
    assert r.tokens == list(b"ab") and len(r.logprobs) == 2  # only whole tokens before the stop string
    (r,) = generate(model, [prompt], max_new_tokens=20, temperature=0, stop=["TOP r"], tokenizer=tok,
                    return_logprobs=True)
    assert r.text == "abc S" and tok.decode(r.tokens) == "abc S"
    # a stop id ends the row and is not included
    (r,) = generate(model, [prompt], max_new_tokens=20, temperature=0, stop_ids=[ord("T")], return_logprobs=True)
    assert r.tokens == list(b"ab") + [256] and r.finish_reason == "stop"
    (r,) = generate(model, [prompt], max_new_tokens=3, temperature=0, stop_ids=[ord("T")], return_logprobs=True)
    assert len(r.tokens) == 3 and r.finish_reason == "length"


def test_stream_joins_to_final_text_with_chinese_never_split():
    tok = ByteTokenizer()
    text = "你好，世界! héllo 🙂 end"
    prompt = [65]
    model = scripted(text.encode() + b"\x00", prompt)
    pieces = stream(model, tok, prompt, max_new_tokens=200, temperature=0, stop_ids=[0])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5
    (full,) = generate(model, [prompt], max_new_tokens=200, temperature=0, stop_ids=[0])
    assert tok.decode(full) == text
    # with a stop string, text that could start it is held back, and the pieces still join exactly
    pieces = stream(model, tok, prompt, max_new_tokens=200, temperature=0, stop=["界! hé", "🙂 x"])
    assert "".join(pieces) == "你好，世"
    pieces = stream(model, tok, prompt, max_new_tokens=200, temperature=0, stop=["🙂 x"], stop_ids=[0])
    assert "".join(pieces) == text


def _valid_prefix(data: bytes, text: str) -> bool:
    """``text`` is ``data`` decoded, and what ``data`` has beyond it is one character cut short."""
    whole = text.encode()
    if not data.startswith(whole) or "\ufffd" in text or len(data) - len(whole) > 3:
        return False
    rest = data[len(whole):]
    return not rest or (rest[0] >= 0xC2 and all(0x80 <= c <= 0xBF for c in rest[1:]))


def test_generated_text_is_valid_utf8_by_construction_greedy_sampled_beams():
    # byte tokens plus pieces that hold parts of characters, as a byte-level BPE has them
    tok = ByteTokenizer(extra=["你", b"\xe5\xa5", b"\xbd\xe4", "é", b"\xf0\x9f"])
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size + 3, block_size=64)).eval()  # 3 ids beyond the tokenizer
    for p in model.parameters():
        p.data.mul_(3.0)  # peaky, far from uniform: the raw model writes stray bytes often
    prompts = [[65], [0xE4, 0xBD]]  # the second prompt ends inside a character: the reply must not complete it
    raw = generate(model, prompts, max_new_tokens=24, temperature=1.0, n=4, seed=0)
    assert sum("\ufffd" in tok.decode([t for t in r if t < 256]) for r in raw) >= 4  # no tokenizer: stray bytes
    runs = [dict(temperature=1.0, n=4, seed=s) for s in range(3)] + [dict(temperature=0), dict(num_beams=3, n=2)]
    for kw in runs:
        for r in generate(model, [prompts[0]], max_new_tokens=24, tokenizer=tok, return_logprobs=True, **kw):
            assert max(r.tokens) < tok.vocab_size and _valid_prefix(tok.decode_bytes(r.tokens), r.text), (kw, r)
    for kw in runs[:4]:
        for r in generate(model, prompts, max_new_tokens=24, tokenizer=tok, return_logprobs=True, **kw):
            assert "\ufffd" not in r.text
        pieces = stream(model, tok, prompts[0], max_new_tokens=24, **{**kw, "n": 1})
        assert "\ufffd" not in "".join(pieces)
    # the log-probs are still those of the unmasked model
    (r,) = generate(model, [prompts[0]], max_new_tokens=12, temperature=1.0, seed=1, tokenizer=tok,
                    return_logprobs=True)
    assert r.logprobs == pytest.approx(score(model, [prompts[0]], [r.tokens])[0], abs=1e-4)


def test_utf8_tables_are_built_once_and_only_where_needed():
    from pocketgpt.engine import _TokenText
    from pocketgpt.tokenizer import Tokenizer

    tok = ByteTokenizer()
    assert _TokenText.of(tok, 256, "cpu") is _TokenText.of(tok, 256, "cpu")
    t = _TokenText.of(tok, 256, "cpu")
    ok = ~t.blocked
    assert ok[0, 0x41] and not ok[0, 0x80] and ok[1, 0x80] and not ok[1, 0x41]  # ASCII / a continuation byte
    assert not ok[0, 0xC0] and not ok[0, 0xFF]  # never in UTF-8
    after_e0 = t.next[0, 0xE0]  # E0 must be followed by A0-BF (80-9F would be an overlong form)
    assert ok[after_e0, 0xA0] and not ok[after_e0, 0x9F] and ok[t.next[after_e0, 0xA0], 0x80]
    char = Tokenizer.train("char", ["hello 你好"])
    assert _TokenText.of(char, char.vocab_size, "cpu").blocked is None  # whole characters: nothing to mask


def test_context_overflow_warns_and_stops_at_the_limit():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32)).eval()
    with pytest.warns(UserWarning, match="more than the model's context"):
        (r,) = generate(model, [list(range(50))], max_new_tokens=100, temperature=0, return_logprobs=True)
    assert r.finish_reason == "length" and 0 < len(r.tokens) <= 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (r,) = generate(model, [list(range(30))], max_new_tokens=10, return_logprobs=True, seed=0)
        assert len(r.tokens) == 3 and r.finish_reason == "length"  # positions 30, 31 fed; a 3rd token predicted
        out = generate(model, [list(range(30)), [1]], max_new_tokens=10, temperature=0)
        assert [len(o) for o in out] == [3, 10]
    rope = GPT(tiny_config(block_size=32, pos="rope")).eval()
    assert len(generate(rope, [list(range(30))], max_new_tokens=10)[0]) == 10  # rope may run past the context


def test_bad_options_are_user_errors():
    model = GPT(tiny_config())
    for kw, msg in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(num_beams=0), "num_beams"),
                    (dict(stop=["x"]), "tokenizer"), (dict(n=4, num_beams=2), "n:")]:
        with pytest.raises(UserError, match=msg):
            generate(model, [[1]], max_new_tokens=2, **kw)
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(UserError, match="outside the vocabulary"):
        generate(model, [[1, 500]])


def test_model_mode_is_restored():
    model = GPT(tiny_config()).train()
    generate(model, [[1]], max_new_tokens=2)
    assert model.training


# ---------------------------------------------------------------------------------------------------------------------
# parity with transformers' generate


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64,
                                  initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    hf.save_pretrained(d)
    return hf, load_model(d)


def hf_generate(hf, prompt, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, **kw)
    return out[:, len(prompt):].tolist()


def test_greedy_equals_transformers(hf_pair):
    hf, ours = hf_pair
    for prompt in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        ref = hf_generate(hf, prompt, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
        assert generate(ours, [prompt], max_new_tokens=12, temperature=0) == ref
        ref = hf_generate(hf, prompt, max_new_tokens=12, pad_token_id=0, eos_token_id=None, repetition_penalty=1.5)
        assert generate(ours, [prompt], max_new_tokens=12, temperature=0, repetition_penalty=1.5) == ref


@pytest.mark.parametrize("length_penalty,early_stopping,prompt", [(1.0, False, [5, 6, 7]), (0.5, False, [42, 9]),
                                                                  (2.0, True, [5, 6, 7]), (1.0, "never", [42, 9])])
def test_beam_search_equals_transformers(hf_pair, length_penalty, early_stopping, prompt):
    hf, ours = hf_pair
    # an end token the beams actually meet: the 4th token of the greedy continuation
    eos = generate(ours, [prompt], max_new_tokens=6, temperature=0)[0][3]
    kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    # the two best hypotheses, best first; ours leave out the stop token (and transformers' padding)
    ref = hf_generate(hf, prompt, max_new_tokens=10, pad_token_id=eos, eos_token_id=eos, num_return_sequences=2, **kw)
    ref = [[t for t in row if t != eos] for row in ref]
    assert generate(ours, [prompt], max_new_tokens=10, stop_ids=[eos], n=2, **kw) == ref


@pytest.mark.parametrize("size", [1, 2, 3])
def test_beam_no_repeat_ngram_size_equals_transformers(hf_pair, size):
    hf, ours = hf_pair
    prompt = [5, 6, 7, 5, 6]  # n-grams of the prompt count too
    kw = dict(num_beams=3, no_repeat_ngram_size=size)
    ref = hf_generate(hf, prompt, max_new_tokens=16, pad_token_id=0, eos_token_id=None, num_return_sequences=2, **kw)
    out = generate(ours, [prompt], max_new_tokens=16, n=2, **kw)
    assert out == ref and out != generate(ours, [prompt], max_new_tokens=16, n=2, num_beams=3)
    for row in out:
        seq = prompt + row
        grams = [tuple(seq[i:i + size]) for i in range(len(seq) - size + 1)]
        start = max(0, len(prompt) - size + 1)  # the first n-gram that ends in the reply
        assert all(g not in grams[:start + k] for k, g in enumerate(grams[start:]))


def test_sample_cli_streams_and_reports_errors(tmp_path, capsys):
    from pocketgpt.cli import main
    from pocketgpt.tokenizer import Tokenizer

    tok = Tokenizer.train("char", ["hello world, 你好世界. the quick brown fox."])
    torch.manual_seed(0)
    save_model(GPT(tiny_config(vocab_size=tok.vocab_size, block_size=64)), tmp_path / "m")
    tok.save(tmp_path / "m" / "tokenizer")
    args = ["sample", "--ckpt", str(tmp_path / "m"), "--prompt", "你好", "--max-new-tokens", "12", "--seed", "3",
            "--top-k", "5", "--n", "2"]
    p = run_cli(*args)  # as a user runs it
    assert main(args) == 0
    assert capsys.readouterr().out == p.stdout and p.stdout.count("你好") >= 2  # seeded: reproducible
    for bad, says in ((["--top-p", "2"], "top_p"), (["--n", "0"], "--n: must be at least 1"),
                      (["--ckpt", str(tmp_path / "nope")], "nope: checkpoint directory not found")):
        assert main(["sample", "--ckpt", str(tmp_path / "m"), "--prompt", "hi", *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("kw", KINDS + [dict(pos="rope", norm="layernorm", mlp="gelu", tie_embeddings=False)],
                         ids=lambda k: f"{k['pos']}-{k.get('mlp', 'gelu')}")
def test_fast_decode_step_equals_model_forward(kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw)).eval()
    idx = torch.randint(0, 97, (3, 9))
    pos = torch.tensor([[4], [6], [8]])
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False
    with torch.no_grad():
        # groups=2: weights split into row blocks for one bmm (the multi-core CPU fp32 path); 1: plain F.linear
        for use_pad, groups in ((False, 1), (True, 1), (False, 2), (True, 2)):
            c1, c2 = model.new_kv_cache(3), model.new_kv_cache(3)
            model(idx[:, :8], kv_cache=c1)
            model(idx[:, :8], kv_cache=c2)
            kw2 = dict(position_ids=pos, attn_mask=mask) if use_pad else {}
            ref, _ = model(idx[:, 8:], kv_cache=c1, last_only=True, **kw2)
            decoder = Decoder(model, groups)
            assert (decoder.head.tail is not None) == (groups > 1)  # 97 = 2 blocks of 48 + a tail of 1
            got = decoder(idx[:, 8], c2, *(kw2.values()))
            torch.testing.assert_close(got, ref[:, -1], atol=1e-5, rtol=1e-5)
            assert c2.pos == c1.pos == 9
            torch.testing.assert_close(c2.kv[1], c1.kv[1])


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_linear_equals_f_linear_with_uneven_split(rows):
    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(48, 64 * 5 + 3, bias=bias)  # 323 outputs: 4 blocks of 80 and a tail of 3
        fast = RowsLinear(lin, 4)
        assert fast.blocks is not None and fast.tail is not None
        x = torch.randn(rows, 48)
        torch.testing.assert_close(fast(x), F.linear(x, lin.weight, lin.bias))


def test_cache_reorder_copies_filled_positions_and_reuses_its_buffer():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    cache = model.new_kv_cache(3, max_len=16)
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 5)), kv_cache=cache)
    before = [t.clone() for t in cache.kv]
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    for old, new in zip(before, cache.kv):
        torch.testing.assert_close(new[:, :, :, :5], old[:, index, :, :5])
    first = cache.kv[0].data_ptr()
    cache.reorder(torch.tensor([1, 0, 2]))
    cache.reorder(torch.tensor([1, 0, 2]))  # back in the first buffer: no new allocation per beam step
    assert cache.kv[0].data_ptr() == first
    assert cache.k[0].data_ptr() == first and torch.equal(cache.v[1], cache.kv[1][1])
    for old, new in zip(before, cache.kv):
        torch.testing.assert_close(new[:, :, :, :5], old[:, index, :, :5])
