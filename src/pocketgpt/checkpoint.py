"""Loading checkpoints: pocketgpt directories and local Hugging Face GPT-2 / Llama directories.

A pocketgpt checkpoint is a directory with ``config.json`` (``"model_type": "pocketgpt"`` + ``GPTConfig`` fields)
and ``model.safetensors``; stages may add ``tokenizer/`` and ``trainer_state.json`` beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .io import read_json


def load_state_file(directory: Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (or a Hugging Face ``pytorch_model.bin``, with ``weights_only=True``)."""
    st = directory / "model.safetensors"
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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
    from .hf import gpt2_config_to_ours, llama_config_to_ours
    from .model import GPTConfig

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


def load_model(directory: str | Path, device=None, dtype=None):
    from .hf import gpt2_state_to_ours, llama_state_to_ours
    from .model import GPT

    directory = Path(directory)
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
    expected = model.state_dict_for_save()
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
