"""Saving and loading models: pocketgpt checkpoint directories, and Hugging Face GPT-2 / Llama directories both ways.

A pocketgpt checkpoint is a directory with ``config.json`` (``"model_type": "pocketgpt"`` + ``GPTConfig`` fields)
and ``model.safetensors``; stages may add ``tokenizer/`` and ``trainer_state.json`` beside them.

    save_model(model, dir)          atomic; keeps the other files already in ``dir``
    write_model(model, tmpdir)      the two files, inside your own ``atomic_dir``
    load_model(dir, device, dtype)  ours, or a Hugging Face GPT-2 / Llama directory (local, or ``hf:NAME``)
    local_dir(path)                 ``hf:NAME`` → its snapshot in the Hugging Face cache; other paths unchanged
    export_hf(model, dir, arch, tokenizer)  a ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` directory that chats
                                    (names mapped in ``hf.py``; tokenizer files, chat template, stop ids)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .hf import gpt2_config_to_ours, gpt2_state_to_ours, llama_config_to_ours, llama_state_to_ours, ours_to_gpt2, \
    ours_to_llama
from .io import atomic_dir, read_json, write_json
from .model import GPT, GPTConfig


def _state_for_save(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors stores no shared tensors; it is wte.weight
    return sd


def write_model(model: GPT, directory: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` into an existing directory (not atomic on its own)."""
    directory = Path(directory)
    write_json(directory / "config.json", {"model_type": "pocketgpt", **model.config.to_dict()})
    save_file(_state_for_save(model), str(directory / "model.safetensors"), metadata={"format": "pt"})


def save_model(model: GPT, directory: str | Path) -> None:
    """Save as a checkpoint directory, atomically (temp dir + rename), keeping the files other stages wrote beside
    the weights (``tokenizer/``, trainer state)."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_model(model, tmp)
        for item in directory.iterdir() if directory.exists() else ():
            if not (tmp / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)


def load_state_file(directory: Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (or a Hugging Face ``pytorch_model.bin``, with ``weights_only=True``)."""
    st = directory / "model.safetensors"
    if st.exists():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{st}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    bin_ = directory / "pytorch_model.bin"
    if bin_.exists():
        try:
            sd = torch.load(str(bin_), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise UserError(f"{bin_}: cannot be loaded safely ({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict):
            raise UserError(f"{bin_}: expected a state dict of tensors")
        return sd
    raise UserError(f"{directory}: no model.safetensors (or pytorch_model.bin) in this checkpoint directory")


def read_model_config(directory: str | Path):
    """Return the ``GPTConfig`` and the source kind (pocketgpt | gpt2 | llama) of a checkpoint directory."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: checkpoint directory not found")
    if not directory.is_dir():
        raise UserError(f"{directory}: a checkpoint must be a directory (config.json + model.safetensors)")
    cfg_path = directory / "config.json"
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    kind = cfg.get("model_type", "pocketgpt")
    where = str(cfg_path)
    if kind == "pocketgpt":
        fields = {k: v for k, v in cfg.items() if k != "model_type"}
        return GPTConfig.from_dict(fields, where), kind
    if kind == "gpt2":
        return gpt2_config_to_ours(cfg, where), kind
    if kind == "llama":
        try:
            return llama_config_to_ours(cfg, where), kind
        except KeyError as e:
            raise UserError(f"{where}: missing field {e}") from None
    raise UserError(f"{where}: model_type {kind!r} is not supported (pocketgpt, gpt2, llama)")


HUB_FILES = ["*.json", "*.safetensors", "merges.txt"]  # weights, configs and tokenizer; not the TF / Flax copies


def local_dir(path: str | Path) -> Path:
    """The local directory of a checkpoint argument: ``hf:NAME`` (any Hugging Face Hub id) is downloaded once into
    the usual Hugging Face cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses only the cache); anything else is a path."""
    if not str(path).startswith("hf:"):
        return Path(path)
    name = str(path)[3:]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{path}: hub models need huggingface_hub: pip install 'pocketgpt[hub]'") from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no access, network: all mean "not available here"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot get {name!r} from the Hugging Face Hub ({reason}); download it where there "
                        f"is network with `huggingface-cli download {name}` (later runs, HF_HUB_OFFLINE=1 included, "
                        f"use the cache) or pass a local directory") from None


def load_model(directory: str | Path, device=None, dtype=None) -> GPT:
    """Load a pocketgpt checkpoint, or a Hugging Face GPT-2 / Llama directory, local or ``hf:NAME`` (fp32 unless
    ``dtype``)."""
    directory = local_dir(directory)
    config, kind = read_model_config(directory)
    sd = load_state_file(directory)
    try:
        if kind == "gpt2":
            sd = gpt2_state_to_ours(sd, config)
        elif kind == "llama":
            sd = llama_state_to_ours(sd, config)
    except KeyError as e:
        raise UserError(f"{directory}: weight {e} missing from the checkpoint") from None
    with torch.device("meta"):
        model = GPT(config, init_weights=False)
    expected = _state_for_save(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        raise UserError(f"{directory}: weights do not match config.json ({'; '.join(parts)})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"{directory}: weight '{k}' has shape {tuple(v.shape)}, config.json implies {tuple(expected[k].shape)}"
            )
    # assign=True puts the loaded tensors in place of the meta ones (no to_empty: its first call imports sympy, ~1 s)
    target_dtype = dtype or torch.float32
    sd = {k: v.to(target_dtype) for k, v in sd.items()}
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.to(device=device or "cpu", dtype=target_dtype)
    model.eval()
    return model


def export_hf(model: GPT, out_dir: str | Path, fmt: str = "auto", tokenizer=None) -> str:
    """Write a Hugging Face directory (config.json + model.safetensors + generation_config.json [+ ``tokenizer`` with
    its chat template]) that ``transformers`` / vLLM load and chat with; returns the architecture."""
    c = model.config
    if fmt == "auto":
        fmt = "llama" if c.pos == "rope" else "gpt2"
    if fmt == "gpt2":
        cfg, sd = ours_to_gpt2(model)
    elif fmt == "llama":
        cfg, sd = ours_to_llama(model)
    else:
        raise UserError(f"unknown export architecture {fmt!r} (gpt2, llama or auto)")
    with atomic_dir(out_dir) as tmp:
        gen = {"_from_model_config": True}
        if tokenizer is not None:
            tokenizer.write_files(tmp)
            ids = tokenizer.write_hf_config(tmp, c.block_size)
            cfg.update(ids)
            # a chat reply ends at <|end|>, a document at <|endoftext|>: generation stops at either
            stops = [tokenizer.special_ids[n] for n in ("<|end|>", "<|endoftext|>") if n in tokenizer.special_ids]
            gen = {**ids, "eos_token_id": stops}
        write_json(tmp / "config.json", cfg)
        save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "generation_config.json", gen)
    return cfg["architectures"][0]
