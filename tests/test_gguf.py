"""`pocketgpt export --format gguf`: the file read back with `gguf.GGUFReader` holds every tensor bit-exact (f32) or
within its quantisation error (f16, q8_0), and what a llama.cpp loader needs. A numpy forward pass that follows
llama.cpp's graphs (interleaved RoPE for llama, fused qkv + learned positions for gpt2) and reads only the file gives
pocketgpt's logits; references of llama.cpp's gpt2 BPE (regex split, lowest-rank merges) and unigram (Viterbi over
scored pieces) over the file's vocabulary give pocketgpt's ids for bpe, char and unigram tokenizers; the chat template renders `chat.render`'s ids."""

import math

import gguf
import jinja2
import numpy as np
import pytest
import regex
import torch

from conftest import run_cli
from pocketgpt.chat import render
from pocketgpt.checkpoint import save_model
from pocketgpt.model import GPT, GPTConfig
from pocketgpt.tokenizer import _GPT2_PATTERN, Tokenizer, _bytes_to_unicode

CORPUS = ["ROMEO:\nWhat, ho! the quick brown fox jumps over the lazy dog.\n\n", "你好，世界！我们今天去公园。",
          "tabs\there,   runs of spaces  and\r\nnewlines\n\n\n", "It's 2024; don't panic -- 42 is the answer."] * 30
TEXTS = ["ROMEO:\nWhat, ho!", "你好，世界！今天", "a  b\t\tc\n\n  d   ", "It's the fox's 42nd jump."]
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=True, tie_embeddings=False)
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def toks():
    return {kind: Tokenizer.train(kind, CORPUS, size) for kind, size in (("bpe", 340), ("char", None),
                                                                           ("unigram", 80))}


def checkpoint(tmp_path, tok, vocab_pad=7, **arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size + vocab_pad, block_size=64, n_layer=2, n_head=4, n_embd=32, **arch))
    with torch.no_grad():  # non-zero biases and norm weights, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt)
    tok.save(ckpt / "tokenizer")
    return model, ckpt


def export(ckpt, out, *opts):
    run_cli("export", "--format", "gguf", *opts, ckpt, out)
    r = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items()}
    return kv, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)


def llamacpp_logits(kv, tensors, ids) -> np.ndarray:
    """The logits llama.cpp's llama / gpt2 graph computes, from the GGUF alone (float64)."""
    arch = kv["general.architecture"]
    W = {k: values(t) for k, t in tensors.items()}
    H, L = kv[f"{arch}.attention.head_count"], kv[f"{arch}.block_count"]
    K = kv.get(f"{arch}.attention.head_count_kv", H)
    eps = kv.get(f"{arch}.attention.layer_norm_rms_epsilon", kv.get(f"{arch}.attention.layer_norm_epsilon"))
    T = len(ids)
    x = W["token_embd.weight"][ids]
    if arch == "gpt2":
        x = x + W["position_embd.weight"][:T]
    D = x.shape[1] // H

    def lin(h, name):
        return h @ W[name + ".weight"].T + W.get(name + ".bias", 0)

    def norm(h, name):
        if arch == "llama":
            return h / np.sqrt((h ** 2).mean(-1, keepdims=True) + eps) * W[name + ".weight"]
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)
        return h * W[name + ".weight"] + W[name + ".bias"]

    def rope(h, n):  # GGML's "normal" RoPE: adjacent pairs (2i, 2i+1) rotate by pos * base^(-2i/D)
        h = h.reshape(T, n, D // 2, 2)
        angle = np.arange(T)[:, None] * kv["llama.rope.freq_base"] ** (-np.arange(0, D, 2) / D)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        return np.stack([h[..., 0] * cos - h[..., 1] * sin, h[..., 0] * sin + h[..., 1] * cos], -1).reshape(T, -1)

    for i in range(L):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if arch == "gpt2":
            q, k, v = np.split(lin(h, b + "attn_qkv"), 3, axis=1)
        else:
            q, k, v = rope(lin(h, b + "attn_q"), H), rope(lin(h, b + "attn_k"), K), lin(h, b + "attn_v")
        q, k, v = q.reshape(T, H, D), k.reshape(T, K, D), v.reshape(T, K, D)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + lin(np.einsum("hts,shd->thd", p, v).reshape(T, H * D), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if arch == "gpt2":
            u = lin(h, b + "ffn_up")
            u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        else:
            g = lin(h, b + "ffn_gate")
            u = g / (1 + np.exp(-g)) * lin(h, b + "ffn_up")
        x = x + lin(u, b + "ffn_down")
    head = "output" if "output.weight" in W else "token_embd"
    return lin(norm(x, "output_norm"), head)


def llamacpp_tokenize(kv, text: str) -> list[int]:
    """llama.cpp's gpt2 BPE: the GPT-2 regex split, byte-level symbols, lowest-rank adjacent merge first."""
    tokens = kv["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(kv["tokenizer.ggml.merges"])}
    table = _bytes_to_unicode()  # GPT-2's byte-level symbols
    out = []
    for word in regex.findall(_GPT2_PATTERN, text):
        syms = [table[b] for b in word.encode("utf-8")]
        while len(syms) > 1:
            r, i = min((ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(syms, syms[1:])))
            if r == math.inf:
                break
            syms[i: i + 2] = [syms[i] + syms[i + 1]]
        out += [vocab[s] for s in syms]
    return out


def llamacpp_unigram_tokenize(kv, text: str) -> list[int]:
    """llama.cpp's unigram ("t5", no space prefix): ' ' as '▁', then the best-scoring split into pieces (Viterbi)."""
    tokens, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    pieces = {t: (i, scores[i]) for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL}
    s = text.replace(" ", "▁")
    best = [(0.0, None)] + [(-math.inf, None)] * len(s)
    for end in range(1, len(s) + 1):
        for start in range(end):
            i, score = pieces.get(s[start:end], (None, 0.0))
            if i is not None and best[start][0] + score > best[end][0]:
                best[end] = (best[start][0] + score, (start, i))
    out, end = [], len(s)
    while end:
        end, i = best[end][1]
        out.append(i)
    return out[::-1]


@pytest.mark.parametrize("kind,arch", [("bpe", LLAMA), ("char", GPT2),
                                       ("unigram", dict(GPT2, tie_embeddings=False, bias=False))])
def test_gguf_tensors_metadata_and_tokenizer(tmp_path, toks, kind, arch):
    tok = toks[kind]
    model, ckpt = checkpoint(tmp_path, tok, **arch)
    c = model.config
    kv, tensors = export(ckpt, tmp_path / "m.gguf")
    name = "llama" if c.pos == "rope" else "gpt2"
    assert kv["general.architecture"] == name
    assert (kv[f"{name}.context_length"], kv[f"{name}.embedding_length"], kv[f"{name}.block_count"],
            kv[f"{name}.feed_forward_length"], kv[f"{name}.attention.head_count"]) == (64, 32, 2, c.mlp_hidden, 4)
    if name == "llama":
        assert kv["llama.attention.head_count_kv"] == 2 and kv["llama.rope.freq_base"] == c.rope_theta
        assert kv["llama.rope.dimension_count"] == 8
        assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    else:
        assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(c.norm_eps)

    # every tensor bit-exact where no re-layout happens; q/k are a permutation of the same values
    sd = model.state_dict()
    wq, wk, _ = sd["h.0.attn.c_attn.weight"].split([32, 16, 16]) if name == "llama" else (None, None, None)
    exact = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["ln_f.weight"],
             "blk.1.attn_norm.weight": sd["h.1.ln_1.weight"], "blk.0.ffn_down.weight": sd["h.0.mlp.c_proj.weight"],
             "blk.1.attn_output.weight": sd["h.1.attn.c_proj.weight"],
             "output.weight": sd["wte.weight" if c.tie_embeddings else "lm_head.weight"]}
    if name == "gpt2":  # GPT-2 in llama.cpp always has biases: zeros stand for none
        exact |= {"position_embd.weight": sd["wpe.weight"], "blk.0.attn_qkv.weight": sd["h.0.attn.c_attn.weight"],
                  "blk.0.attn_qkv.bias": sd.get("h.0.attn.c_attn.bias", torch.zeros(96))}
    else:
        for t, w in (("attn_q", wq), ("attn_k", wk)):
            got = tensors[f"blk.0.{t}.weight"].data
            assert np.array_equal(np.sort(got, axis=None), np.sort(w.numpy(), axis=None)) and not np.array_equal(got, w)
    for key, w in exact.items():
        assert tensors[key].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(tensors[key].data, w.numpy()), key
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())

    ids = [tok.eos_id] + tok.encode(TEXTS[0] + TEXTS[1])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0].double().numpy()
    np.testing.assert_allclose(llamacpp_logits(kv, tensors, ids), want, atol=2e-5, rtol=1e-4)

    # vocabulary: pocketgpt's ids from llama.cpp's tokenizer, the special ids, unused padding rows
    model = {"bpe": "gpt2", "char": "gpt2", "unigram": "t5"}[kind]
    assert kv["tokenizer.ggml.model"] == model and kv.get("tokenizer.ggml.pre") == {"gpt2": "gpt-2"}.get(model)
    for text in TEXTS:
        assert {"gpt2": llamacpp_tokenize, "t5": llamacpp_unigram_tokenize}[model](kv, text) == tok.encode(text), text
    sp = tok.special_ids
    assert len(kv["tokenizer.ggml.tokens"]) == c.vocab_size
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (sp["<|endoftext|>"], sp["<|end|>"], sp["<|pad|>"])
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    types = kv["tokenizer.ggml.token_type"]
    assert {types[i] for i in sp.values()} == {gguf.TokenType.CONTROL}
    assert [kv["tokenizer.ggml.tokens"][i] for i in sp.values()] == list(sp)
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}

    # the chat template renders chat.render's ids (llama.cpp parses the special tokens in it; its Jinja mode drops
    # the leading BOS and adds one by add_bos_token, so there is one either way)
    template = jinja2.Environment().from_string(kv["tokenizer.chat_template"])
    for messages in ([{"role": "user", "content": "你好，世界"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
                      {"role": "assistant", "content": "What, ho!"}, {"role": "user", "content": "again\n"}]):
        for gen in (True, False):
            text = template.render(messages=messages, add_generation_prompt=gen, bos_token="<|endoftext|>")
            assert tok.encode(text, allow_special=True) == render(messages, tok, add_generation_prompt=gen)[0]


def test_gguf_f16_and_q8_0_are_within_their_quantisation_error(tmp_path, toks):
    model, ckpt = checkpoint(tmp_path, toks["bpe"], **LLAMA)  # every row a multiple of 32 values
    _, ref = export(ckpt, tmp_path / "f32.gguf")
    kv16, f16 = export(ckpt, tmp_path / "f16.gguf", "--dtype", "f16")
    kv8, q8 = export(ckpt, tmp_path / "q8.gguf", "--dtype", "q8_0")
    assert (kv16["general.file_type"], kv8["general.file_type"]) == (1, 7)
    assert set(f16) == set(q8) == set(ref)
    for name, t in ref.items():
        x = t.data
        if x.ndim == 1:  # norms and biases stay f32
            assert f16[name].tensor_type == q8[name].tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(f16[name].data, x) and np.array_equal(q8[name].data, x)
            continue
        assert f16[name].tensor_type == gguf.GGMLQuantizationType.F16
        assert np.array_equal(f16[name].data, x.astype(np.float16)), name
        assert q8[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        blocks = x.reshape(-1, 32)
        step = np.abs(blocks).max(1, keepdims=True) / 127  # one q8_0 step of each 32-value block
        err = np.abs(values(q8[name]).reshape(-1, 32) - blocks)
        assert (err <= 0.6 * step).all() and err.max() > 0, name  # half a step, + the step's own f16 rounding
    ids = [0] + toks["bpe"].encode(TEXTS[2])
    want = llamacpp_logits(kv16, ref, ids)
    assert np.abs(llamacpp_logits(kv8, q8, ids) - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("change,message", [
    (dict(kind="word"), "a 'word' tokenizer splits text unlike any llama.cpp tokenizer; train the tokenizer with "
                        "--kind bpe, unigram or char"),
    (dict(pos="sinusoidal"), "GGUF gpt2: not exportable as GPT-2: pos='sinusoidal' (GPT-2 needs 'learned')"),
    (dict(mlp="relu"), "GGUF gpt2: mlp='relu' (llama.cpp's gpt2 has GELU: train with --mlp gelu, or rope + rmsnorm "
                       "+ swiglu for llama)"),
])
def test_gguf_refuses_what_llama_cpp_cannot_run_in_one_line(tmp_path, toks, change, message):
    kind = change.pop("kind", "char")
    tok = toks[kind] if kind in toks else Tokenizer.train(kind, CORPUS, 60)
    _, ckpt = checkpoint(tmp_path, tok, **{**GPT2, **change})
    p = run_cli("export", "--format", "gguf", ckpt, tmp_path / "m.gguf", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert not list(tmp_path.glob("m.gguf*"))
