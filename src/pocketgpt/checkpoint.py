"""Saving and loading models: pocketgpt checkpoint directories (``config.json`` + ``model.safetensors``, beside which
stages keep ``tokenizer/`` and ``trainer_state.json``), and Hugging Face GPT-2 / Llama directories both ways."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .hf import ARCHS, config_to_ours, to_hf, to_ours
from .io import atomic_dir, read_json, write_json
from .lora import fold_state
from .model import GPT, GPTConfig
from .runtime import DTYPES, pick_device
from .tokenizer import CHAT_TOKENS, load_tokenizer_for


def _state_for_save(model: GPT) -> dict[str, torch.Tensor]:
    tied = model.config.tie_embeddings  # safetensors stores no shared tensors: a tied lm_head.weight is wte.weight
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def write_model(model: GPT, directory: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` into an existing directory (not atomic on its own)."""
    directory = Path(directory)
    write_json(directory / "config.json", {"model_type": "pocketgpt", **model.config.to_dict()})
    save_file(_state_for_save(model), str(directory / "model.safetensors"), metadata={"format": "pt"})


def save_model(model: GPT, directory: str | Path, beside: str | Path | None = None, skip=()) -> None:
    """Save as a checkpoint directory, atomically (temp dir + rename), with the files other stages wrote beside the
    weights (``tokenizer/``, trainer state) in ``beside`` (default: ``directory``), but for the names in ``skip``."""
    beside = Path(beside or directory)
    with atomic_dir(directory) as tmp:
        write_model(model, tmp)
        for item in beside.iterdir() if beside.exists() else ():
            if item.name not in skip and not (tmp / item.name).exists():
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
    if kind == "pocketgpt":
        return GPTConfig.from_dict({k: v for k, v in cfg.items() if k != "model_type"}, str(cfg_path)), kind
    if kind in ARCHS:
        return config_to_ours(cfg, kind, str(cfg_path)), kind
    raise UserError(f"{cfg_path}: model_type {kind!r} is not supported (pocketgpt, gpt2, llama)")


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


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (``hf:NAME`` too), or a run directory holding one (``RUN/ckpt``, else ``RUN/best``)."""
    p = local_dir(path)
    if not p.exists():
        raise UserError(f"{p}: checkpoint directory not found")
    for d in (p, p / "ckpt", p / "best"):  # RUN/ckpt is a Trainer run's final model
        if (d / "config.json").exists():
            return d
    raise UserError(f"{p}: not a checkpoint directory (no config.json) nor a run directory holding one")


def load_model(directory: str | Path, device=None, dtype=None) -> GPT:
    """Load a pocketgpt or Hugging Face GPT-2 / Llama checkpoint, local or ``hf:NAME`` (fp32 unless ``dtype``)."""
    directory = local_dir(directory)
    config, kind = read_model_config(directory)
    sd = fold_state(load_state_file(directory))  # a LoRA checkpoint's adapters become plain weights (lora.py)
    with torch.device("meta"):
        model = GPT(config, init_weights=False)
    expected = _state_for_save(model)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # wte.weight
    if kind != "pocketgpt":
        try:
            sd = to_ours(sd, expected, kind)
        except KeyError as e:
            raise UserError(f"{directory}: weight {e} missing from the checkpoint") from None
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = [f"{what} weights {names[:3]}{'...' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise UserError(f"{directory}: weights do not match config.json ({'; '.join(parts)})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{directory}: weight '{k}' has shape {tuple(v.shape)}, "
                            f"config.json implies {tuple(expected[k].shape)}")
    dtype = dtype or torch.float32
    # assign=True puts the loaded tensors in place of the meta ones (no to_empty: its first call imports sympy)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)  # names checked above
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model.to(device=device or "cpu", dtype=dtype).eval()


def load_checkpoint(ckpt: str | os.PathLike, device: str = "auto", dtype: str = "fp32", chat: bool = False):
    """Model (eval mode) + tokenizer of a checkpoint (a run directory, ``hf:NAME``); ``chat=True`` needs chat tokens."""
    path = find_checkpoint(ckpt)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown precision {dtype!r} (fp32, bf16, fp16)")
    model = load_model(path, device=pick_device(device), dtype=DTYPES[dtype])
    tokenizer = load_tokenizer_for(path)
    if chat and not set(CHAT_TOKENS) <= set(tokenizer.special_ids):
        raise UserError(f"{path}: this checkpoint's tokenizer has no chat tokens; fine-tune it first "
                        f"(pocketgpt sft --init {path} --data ...)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}")
    return model, tokenizer


def export_hf(model: GPT, out_dir: str | Path, fmt: str = "auto", tokenizer=None) -> str:
    """Write a Hugging Face directory (config.json + model.safetensors + generation_config.json [+ ``tokenizer`` with
    its chat template]) that ``transformers`` / vLLM load and chat with; returns the architecture."""
    cfg, sd = to_hf(model, fmt)
    with atomic_dir(out_dir) as tmp:
        gen = {"_from_model_config": True}
        if tokenizer is not None:
            tokenizer.write_files(tmp)
            ids = tokenizer.write_hf_config(tmp, model.config.block_size)
            cfg.update(ids)
            # a chat reply ends at <|end|>, a document at <|endoftext|>: generation stops at either
            stops = [tokenizer.special_ids[n] for n in ("<|end|>", "<|endoftext|>") if n in tokenizer.special_ids]
            gen = {**ids, "eos_token_id": stops}
        write_json(tmp / "config.json", cfg)
        save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json(tmp / "generation_config.json", gen)
    return cfg["architectures"][0]
