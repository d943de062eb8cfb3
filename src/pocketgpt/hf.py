"""Hugging Face names: our config and tensors as ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` ones, both ways, by table
(``checkpoint`` reads and writes the directories)."""

from __future__ import annotations

import re

import torch

from .errors import UserError
from .model import GPT, GPTConfig

# per architecture: its names, what our config must be (mlp: ours -> the Hugging Face activation), and the config
# fields that map one to one (Hugging Face field: ours, the default when absent; ...: required; None: our default)
ARCHS = {
    "gpt2": {
        "name": "GPT-2", "class": "GPT2LMHeadModel", "pos": "learned", "norm": "layernorm",
        "act": ("activation_function", "gelu_new"), "mlp": {"gelu": "gelu_new", "relu": "relu"},
        "fields": {"vocab_size": ("vocab_size", 50257), "n_positions": ("block_size", 1024),
                   "n_layer": ("n_layer", 12), "n_head": ("n_head", 12), "n_embd": ("n_embd", 768),
                   "n_inner": ("mlp_hidden", None), "layer_norm_epsilon": ("norm_eps", 1e-5),
                   "tie_word_embeddings": ("tie_embeddings", True)},
    },
    "llama": {
        "name": "Llama", "class": "LlamaForCausalLM", "pos": "rope", "norm": "rmsnorm",
        "act": ("hidden_act", "silu"), "mlp": {"swiglu": "silu"},
        "fields": {"vocab_size": ("vocab_size", ...), "max_position_embeddings": ("block_size", 2048),
                   "num_hidden_layers": ("n_layer", ...), "num_attention_heads": ("n_head", ...),
                   "hidden_size": ("n_embd", ...), "num_key_value_heads": ("n_kv_head", None),
                   "intermediate_size": ("mlp_hidden", ...), "rms_norm_eps": ("norm_eps", 1e-6),
                   "attention_bias": ("bias", False), "tie_word_embeddings": ("tie_embeddings", False),
                   "rope_theta": ("rope_theta", 10000.0)},
    },
}
GELU_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}  # the same tanh GELU
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2: (in, out)
# our Llama module -> the Llama modules stacked in it along dim 0
LLAMA = {"wte": ["model.embed_tokens"], "ln_f": ["model.norm"], "lm_head": ["lm_head"], "ln_1": ["input_layernorm"],
         "ln_2": ["post_attention_layernorm"], "attn.c_proj": ["self_attn.o_proj"],
         "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.c_proj": ["mlp.down_proj"]}
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # causal masks and RoPE tables of old files


def config_to_ours(hf: dict, kind: str, where: str) -> GPTConfig:
    """Our config of a Hugging Face ``config.json`` (``kind`` gpt2 or llama)."""
    a = ARCHS[kind]
    field, default = a["act"]
    act = hf.get(field, default)
    mlp = {v: k for k, v in a["mlp"].items()}.get(GELU_ALIASES.get(act, act))
    if mlp is None:
        raise UserError(f"{where}: field {field!r} {act!r} is not supported ({' or '.join(a['mlp'].values())})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise UserError(f"{where}: field 'rope_scaling' type {rope_type!r} is not supported (only default RoPE)")
    # older or newer homes of two fields: GPT-2's n_ctx, transformers v5's rope_parameters
    hf = {**hf, "n_positions": hf.get("n_positions", hf.get("n_ctx")),
          "rope_theta": hf.get("rope_theta") or rope.get("rope_theta")}
    fields = {"pos": a["pos"], "norm": a["norm"], "mlp": mlp, "bias": True}  # GPT-2 always has biases
    for name, (ours, default) in a["fields"].items():
        if hf.get(name) is None and default is ...:
            raise UserError(f"{where}: missing field {name!r}")
        fields[ours] = default if hf.get(name) is None else hf[name]
    config = GPTConfig.from_dict(fields, where)
    if hf.get("head_dim") not in (None, config.head_dim):
        raise UserError(f"{where}: field 'head_dim' must equal hidden_size / num_attention_heads")
    return config


def hf_names(key: str, kind: str) -> list[str]:
    """The Hugging Face tensors that our tensor ``key`` holds, stacked along dim 0."""
    if kind == "gpt2":
        return [key if key.startswith("lm_head") else "transformer." + key]
    layer, module, suffix = re.fullmatch(r"(?:h\.(\d+)\.)?(.+)\.(weight|bias)", key).groups()
    prefix = "" if layer is None else f"model.layers.{layer}."
    return [f"{prefix}{name}.{suffix}" for name in LLAMA[module]]


def to_ours(sd: dict[str, torch.Tensor], keys, kind: str) -> dict[str, torch.Tensor]:
    """Our tensors ``keys`` from a Hugging Face state dict (KeyError: one is missing) + the unused ones to report."""
    if kind == "gpt2":  # the original GPT-2 files name their tensors without "transformer."
        sd = {k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v for k, v in sd.items()}
    left = {k: v for k, v in sd.items() if not k.endswith(BUFFERS)}
    out = {}
    for key in keys:
        parts = [left.pop(name) for name in hf_names(key, kind)]
        v = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[key] = v.t().contiguous() if kind == "gpt2" and key.endswith(CONV1D) else v
    return out | left


def to_hf(model: GPT, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Hugging Face ``config.json`` and state dict of ``model`` as ``kind`` (gpt2, llama; auto: by positions)."""
    if kind == "auto":
        kind = "llama" if model.config.pos == "rope" else "gpt2"
    if kind not in ARCHS:
        raise UserError(f"unknown export architecture {kind!r} (gpt2, llama or auto)")
    c, a = model.config, ARCHS[kind]
    problems = [f"{field}={getattr(c, field)!r} ({a['name']} needs {' or '.join(map(repr, allowed))})"
                for field, allowed in (("pos", [a["pos"]]), ("norm", [a["norm"]]), ("mlp", list(a["mlp"])))
                if getattr(c, field) not in allowed]
    if kind == "gpt2" and c.n_kv_head != c.n_head:
        problems.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)")
    if problems:
        raise UserError(f"not exportable as {a['name']}: " + "; ".join(problems))
    cfg = {"architectures": [a["class"]], "model_type": kind, a["act"][0]: a["mlp"][c.mlp],
           **{name: getattr(c, ours) for name, (ours, _) in a["fields"].items()}}
    if kind == "gpt2":
        cfg |= {"n_ctx": c.block_size, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    else:
        cfg |= {"head_dim": c.head_dim, "mlp_bias": c.bias,
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and c.tie_embeddings)}
    if kind == "gpt2" and not c.bias:  # GPT-2 always has biases: zeros are the exact equivalent of none
        state |= {k.removesuffix("weight") + "bias": torch.zeros(len(v), dtype=v.dtype)
                  for k, v in state.items() if k.startswith(("h.", "ln_f"))}
    sd, kv = {}, c.n_kv_head * c.head_dim
    for key, v in state.items():
        names = hf_names(key, kind)
        v = v.t() if kind == "gpt2" and key.endswith(CONV1D) else v
        parts = v.split([c.n_embd, kv, kv]) if len(names) == 3 else v.chunk(len(names))  # q, k, v or gate, up
        sd.update(zip(names, parts))
    return cfg, {k: v.detach().contiguous().clone() for k, v in sd.items()}


