"""Hugging Face interop: weight-name mappings for GPT-2 (import/export) and Llama (import/export).

GPT-2 stores its linear layers as ``Conv1D`` with weights of shape (in, out): they are transposed on the way in and
out. A pocketgpt model with learned positions + layernorm + gelu/relu exports as ``GPT2LMHeadModel``; one with
rope + rmsnorm + swiglu exports as ``LlamaForCausalLM`` (so vLLM / llama.cpp can serve it). Other combinations have
no faithful Hugging Face architecture and are refused with the option at fault named. The entry points that read
and write such directories (``load_model``, ``export_hf``) are in ``checkpoint.py``.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .model import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config_to_ours(hf: dict, where: str) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        mlp = "gelu"
    elif act == "relu":
        mlp = "relu"
    else:
        raise UserError(f"{where}: field 'activation_function' {act!r} is not supported (gelu_new or relu)")
    n_embd = hf.get("n_embd", 768)
    try:
        return GPTConfig.from_dict(dict(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            bias=True,
            pos="learned",
            norm="layernorm",
            mlp=mlp,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            mlp_hidden=hf.get("n_inner") or 4 * n_embd,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        ), where)
    except TypeError as e:
        raise UserError(f"{where}: bad GPT-2 config ({e})") from None


def gpt2_state_to_ours(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for k, v in sd.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of old checkpoints
        if k.endswith(conv1d):
            v = v.t()
        out[k] = v.contiguous()
    if "lm_head.weight" not in out and not config.tie_embeddings:
        raise UserError("GPT-2 checkpoint has untied embeddings but no lm_head.weight")
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def ours_to_gpt2(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    c = model.config
    problems = []
    if c.pos != "learned":
        problems.append(f"pos={c.pos!r} (GPT-2 needs 'learned')")
    if c.norm != "layernorm":
        problems.append(f"norm={c.norm!r} (GPT-2 needs 'layernorm')")
    if c.mlp not in ("gelu", "relu"):
        problems.append(f"mlp={c.mlp!r} (GPT-2 needs 'gelu' or 'relu')")
    if c.n_kv_head != c.n_head:
        problems.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)")
    if problems:
        raise UserError("not exportable as GPT-2: " + "; ".join(problems))
    cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.mlp_hidden,
        "activation_function": "gelu_new" if c.mlp == "gelu" else "relu",
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
    }
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if c.tie_embeddings:
                continue
            sd[k] = v.contiguous()
            continue
        if k.endswith(conv1d):
            v = v.t()
        sd["transformer." + k] = v.contiguous()
    if not c.bias:  # GPT-2 always has biases: zeros are the exact equivalent of none
        for name, p in list(sd.items()):
            if name.endswith(".weight") and (".ln_" in name or "ln_f" in name or any(s in name for s in conv1d)):
                bname = name[: -len("weight")] + "bias"
                if bname not in sd:
                    n_out = p.shape[-1] if any(s in name for s in conv1d) else p.shape[0]
                    sd[bname] = torch.zeros(n_out, dtype=p.dtype)
    return cfg, sd


# ---------------------------------------------------------------------------------------------------------------------
# Llama


def llama_config_to_ours(hf: dict, where: str) -> GPTConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: field 'hidden_act' {act!r} is not supported (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise UserError(f"{where}: field 'rope_scaling' type {rope_type!r} is not supported (only default RoPE)")
    theta = hf.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    n_embd = hf["hidden_size"]
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise UserError(f"{where}: field 'head_dim' must equal hidden_size / num_attention_heads")
    return GPTConfig.from_dict(dict(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        bias=bool(hf.get("attention_bias", False)),
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mlp_hidden=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
    ), where)


def llama_state_to_ours(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    g = lambda k: sd[k]  # noqa: E731
    out["wte.weight"] = g("model.embed_tokens.weight")
    out["ln_f.weight"] = g("model.norm.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = g("lm_head.weight")
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        out[f"h.{i}.ln_1.weight"] = g(p + "input_layernorm.weight")
        out[f"h.{i}.ln_2.weight"] = g(p + "post_attention_layernorm.weight")
        out[f"h.{i}.attn.c_attn.weight"] = torch.cat(
            [g(p + "self_attn.q_proj.weight"), g(p + "self_attn.k_proj.weight"), g(p + "self_attn.v_proj.weight")]
        )
        if config.bias:
            out[f"h.{i}.attn.c_attn.bias"] = torch.cat(
                [g(p + "self_attn.q_proj.bias"), g(p + "self_attn.k_proj.bias"), g(p + "self_attn.v_proj.bias")]
            )
            out[f"h.{i}.attn.c_proj.bias"] = g(p + "self_attn.o_proj.bias")
            out[f"h.{i}.mlp.c_fc.bias"] = torch.cat([g(p + "mlp.gate_proj.bias"), g(p + "mlp.up_proj.bias")])
            out[f"h.{i}.mlp.c_proj.bias"] = g(p + "mlp.down_proj.bias")
        out[f"h.{i}.attn.c_proj.weight"] = g(p + "self_attn.o_proj.weight")
        out[f"h.{i}.mlp.c_fc.weight"] = torch.cat([g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")])
        out[f"h.{i}.mlp.c_proj.weight"] = g(p + "mlp.down_proj.weight")
    return out


def ours_to_llama(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    c = model.config
    problems = []
    if c.pos != "rope":
        problems.append(f"pos={c.pos!r} (Llama needs 'rope')")
    if c.norm != "rmsnorm":
        problems.append(f"norm={c.norm!r} (Llama needs 'rmsnorm')")
    if c.mlp != "swiglu":
        problems.append(f"mlp={c.mlp!r} (Llama needs 'swiglu')")
    if problems:
        raise UserError("not exportable as Llama: " + "; ".join(problems))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "hidden_act": "silu",
        "attention_bias": c.bias,
        "mlp_bias": c.bias,
        "tie_word_embeddings": c.tie_embeddings,
    }
    sd_in = model.state_dict()
    H, K, D = c.n_head, c.n_kv_head, c.head_dim
    out = {"model.embed_tokens.weight": sd_in["wte.weight"], "model.norm.weight": sd_in["ln_f.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd_in["lm_head.weight"]
    for i in range(c.n_layer):
        p, q = f"model.layers.{i}.", f"h.{i}."
        out[p + "input_layernorm.weight"] = sd_in[q + "ln_1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd_in[q + "ln_2.weight"]
        wq, wk, wv = sd_in[q + "attn.c_attn.weight"].split([H * D, K * D, K * D])
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = wq, wk, wv
        out[p + "self_attn.o_proj.weight"] = sd_in[q + "attn.c_proj.weight"]
        gate, up = sd_in[q + "mlp.c_fc.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd_in[q + "mlp.c_proj.weight"]
        if c.bias:
            bq, bk, bv = sd_in[q + "attn.c_attn.bias"].split([H * D, K * D, K * D])
            out[p + "self_attn.q_proj.bias"], out[p + "self_attn.k_proj.bias"], out[p + "self_attn.v_proj.bias"] = bq, bk, bv
            out[p + "self_attn.o_proj.bias"] = sd_in[q + "attn.c_proj.bias"]
            bg, bu = sd_in[q + "mlp.c_fc.bias"].chunk(2)
            out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"] = bg, bu
            out[p + "mlp.down_proj.bias"] = sd_in[q + "mlp.c_proj.bias"]
    return cfg, {k: v.detach().contiguous().clone() for k, v in out.items()}
