"""GGUF export for llama.cpp / Ollama, as llama.cpp's own ``convert_hf_to_gguf.py`` does it, with its ``gguf``
package: ``hf.to_hf``'s tensors renamed by gguf's tensor map, and the tokenizer as one llama.cpp knows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint
from .errors import UserError
from .hf import CONV1D, to_hf
from .tokenizer import CHAT_TEMPLATE, _bytes_to_unicode

try:
    import gguf
except ImportError:  # an optional extra: export_gguf says how to install it
    gguf = None


def _permute(w, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: rotate-half rows of each head → interleaved (even, odd) pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(w, **keys) -> None:
    for key, value in keys.items():  # in order: w.add_KEY(value)
        getattr(w, "add_" + key)(value)


def _tensors(model, arch: str) -> dict:
    """GGUF name → float32 numpy array, from the Hugging Face export of ``model`` (detached CPU copies)."""
    c = model.config
    try:
        _, sd = to_hf(model, arch)
    except UserError as e:
        raise UserError(f"GGUF {arch}: {e}") from None
    if arch == "gpt2" and c.mlp != "gelu":
        raise UserError(f"GGUF gpt2: mlp={c.mlp!r} (llama.cpp's gpt2 has GELU: train with --mlp gelu, or "
                        "rope + rmsnorm + swiglu for llama)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, c.n_layer)
    out = {}
    for name, t in sd.items():
        if arch == "gpt2" and name.endswith(CONV1D):  # llama.cpp's gpt2 wants them (out, in) again
            t = t.t()
        if ".q_proj." in name or ".k_proj." in name:  # rotate-half RoPE (ours, HF's) -> GGML's interleaved
            t = _permute(t, c.n_head if ".q_proj." in name else c.n_kv_head)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t.float().contiguous().numpy()
    if arch == "gpt2" and "output.weight" not in out:  # llama.cpp's gpt2 loader wants one, even when tied
        out["output.weight"] = out["token_embd.weight"]
    return out


def _write_vocab(w, tok, n_vocab: int) -> None:
    """The tokenizer keys: llama.cpp's gpt2 BPE (bpe; char: each character the token of its UTF-8 bytes, merges
    rebuilding multi-byte ones) or its unigram "t5" (unigram); ``word`` splits text unlike any and is refused."""
    spec = json.loads(tok._hf.to_str())  # the Hugging Face tokenizer.json behind a pocketgpt Tokenizer
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    added = {t["id"]: t["content"] for t in spec.get("added_tokens") or []}
    n = tok.vocab_size  # <= n_vocab (load_checkpoint); the other rows are padding
    types = [gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in range(n)]
    tokens, merges = [added.get(i) or tok._hf.id_to_token(i) for i in range(n)], []
    if model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
            and not pre.get("add_prefix_space") and spec.get("normalizer") is None:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    elif tok.kind == "char":
        table = _bytes_to_unicode()
        for i, piece in enumerate(tokens):
            if i in added or piece == model.get("unk_token"):
                types[i] = gguf.TokenType.CONTROL if i in added else gguf.TokenType.UNKNOWN
                continue
            tokens[i] = chars = "".join(table[b] for b in piece.encode("utf-8"))  # merge its bytes left to right
            merges += [f"{chars[:k]} {chars[k]}" for k in range(1, len(chars))]
    elif tok.kind == "unigram":  # llama.cpp's Viterbi over the text with ' ' as '▁' = HF's Metaspace split
        types[model["unk_id"]] = gguf.TokenType.UNKNOWN
        scores = [0.0 if i in added else float(model["vocab"][i][1]) for i in range(n)] + [-1e9] * (n_vocab - n)
        _add(w, token_scores=scores, unk_token_id=model["unk_id"], add_space_prefix=False,
             remove_extra_whitespaces=False)
    else:
        raise UserError(f"GGUF: a {tok.kind!r} tokenizer splits text unlike any llama.cpp tokenizer; train the "
                        "tokenizer with --kind bpe, unigram or char")
    w.add_tokenizer_model("t5" if tok.kind == "unigram" else "gpt2")
    if tok.kind != "unigram":
        _add(w, tokenizer_pre="gpt-2", token_merges=list(dict.fromkeys(merges)))
    _add(w, token_list=tokens + [f"[PAD{i}]" for i in range(n, n_vocab)],
         token_types=types + [gguf.TokenType.UNUSED] * (n_vocab - n))


def export_gguf(ckpt, path: str | os.PathLike, dtype: str = "f32", arch: str = "auto") -> str:
    """Write a checkpoint (model + tokenizer) as one GGUF file, atomically; returns the llama.cpp architecture."""
    if gguf is None:
        raise UserError("gguf is not installed: pip install 'pocketgpt[gguf]'")
    model, tokenizer = load_checkpoint(ckpt, device="cpu")
    c = model.config
    if arch == "auto":
        arch = "llama" if c.pos == "rope" else "gpt2"
    tensors = _tensors(model, arch)
    special = tokenizer.special_ids
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    _add(w, name=path.stem, file_type=file_type, context_length=c.block_size, embedding_length=c.n_embd,
         feed_forward_length=c.mlp_hidden, block_count=c.n_layer, head_count=c.n_head)
    if arch == "llama":
        _add(w, head_count_kv=c.n_kv_head, rope_freq_base=c.rope_theta, rope_dimension_count=c.head_dim,
             layer_norm_rms_eps=c.norm_eps, vocab_size=c.vocab_size)
    else:
        w.add_layer_norm_eps(c.norm_eps)
    _write_vocab(w, tokenizer, c.vocab_size)
    # bos is <|endoftext|>: every pocketgpt document starts with it
    _add(w, bos_token_id=tokenizer.eos_id, eos_token_id=special.get("<|end|>", tokenizer.eos_id),
         pad_token_id=tokenizer.pad_id, add_bos_token=True, add_eos_token=False)
    if "<|end|>" in special:  # llama.cpp drops the chat template's leading BOS and adds one by add_bos_token
        _add(w, eot_token_id=special["<|end|>"], chat_template=CHAT_TEMPLATE)
    for name, a in tensors.items():
        if a.ndim == 2 and dtype == "q8_0" and a.shape[-1] % 32 == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        elif a.ndim == 2 and dtype != "f32":  # f16, and q8_0's fallback (as convert_hf_to_gguf does)
            w.add_tensor(name, a.astype(np.float16))
        else:  # and 1-D tensors (norms, biases) always
            w.add_tensor(name, a.astype(np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return arch
