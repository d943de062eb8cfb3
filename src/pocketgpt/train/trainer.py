"""The one training loop every stage (pretrain, SFT, reward model, DPO, PPO, GRPO) reuses: a stage supplies batches
and a loss, the ``Trainer`` owns the rest (Stage protocol, run directory, resume, time budgets: docs/internals.md)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, Protocol

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
from pydantic import Field, model_validator
from torch.utils._pytree import tree_leaves, tree_map  # (torch's own walk through nested containers)
from tqdm import tqdm

from .. import lora, runtime
from ..checkpoint import write_model
from ..config import Config, FieldError, StrList, dump_toml
from ..errors import UserError
from ..io import atomic_dir, atomic_write_text, read_json, write_json
from ..model import GPT, Block
from .plots import plot_metrics, read_metrics

# [train] fields a resumed run may change: how long, how often and where it runs, never what it trains
RESUMABLE = frozenset({"max_steps", "max_minutes", "eval_interval", "eval_batches", "ckpt_interval", "log_interval",
                       "keep_best", "progress", "device", "dtype", "compile", "optimizer_impl", "ddp_find_unused",
                       "parallel"})
MEASURED_STEPS = 5  # steps timed (after a process's first) before a time budget sizes the schedule
PAUSE_SHARE = 0.04  # of a time budget, at most, for evaluations + checkpoints (the measured one included)


class TrainConfig(Config):
    section: ClassVar[str] = "train"
    max_steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)  # sequences per micro-batch per process
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step
    lr: float = Field(6e-4, gt=0)
    min_lr: float = Field(6e-5, ge=0)  # at most lr
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after linear warmup
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping
    # muon: torch.optim.Muon for the hidden weight matrices (at muon_lr, same schedule), AdamW (lr) for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = Field(0.02, gt=0)
    # autocast; master weights stay fp32. auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32
    dtype: Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    compile: bool = False
    eval_interval: int = Field(100, ge=0)  # 0 = only at the end
    eval_batches: int = Field(20, ge=0)
    ckpt_interval: int = Field(100, ge=0)  # 0 = only at the end
    log_interval: int = Field(10, ge=0)
    seed: int = 1337
    keep_best: bool = True
    max_minutes: float = Field(0.0, ge=0)  # wall-clock budget (0 = none): the schedule is sized to the steps that fit
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # AdamW implementation
    ddp_find_unused: bool = False  # DDP find_unused_parameters (wrapper models with unused heads)
    # under torchrun: each rank holds the whole model (ddp) or a 1/N shard of weights, grads and optimizer (fsdp)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    progress: bool = True  # tqdm bar (also off when stderr is not a terminal or CI is set)
    lora_r: int = Field(0, ge=0)  # LoRA adapters of this rank for sft, dpo, rm (0 = train every weight; lora.py)
    lora_alpha: float = Field(16.0, gt=0)  # the adapters' update is scaled by lora_alpha / lora_r
    lora_targets: StrList = ["c_attn", "c_proj", "c_fc"]  # linear layers (name suffixes) given adapters

    @model_validator(mode="after")
    def _min_lr_at_most_lr(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr!r}")
        return self


class Stage(Protocol):
    """What every stage supplies (optional members: docs/internals.md)."""

    name: str

    def get_batch(self, step: int, micro: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


# ---- distributed helpers -------------------------------------------------------------------------------------------


def world_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process: (0, 1, 0) without torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by ``torchrun`` (env vars); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not torch.distributed.is_initialized():
        if device.type == "cuda":
            if (device.index or 0) >= torch.cuda.device_count():
                raise UserError(f"torchrun: this process (local rank {os.environ.get('LOCAL_RANK', 0)}) would use GPU "
                                f"{device.index or 0}, but there are {torch.cuda.device_count()}: use "
                                f"--nproc_per_node {torch.cuda.device_count()} or fewer, or --device cpu")
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), 0.0), 1.0)
    coeff = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


# ---- checkpoint pieces: model weights, optimizer, RNG --------------------------------------------------------------


def default_save_model(model: nn.Module, directory: Path) -> None:
    """``checkpoint.write_model`` for a GPT; otherwise the state dict as ``model.safetensors``."""
    if isinstance(model, GPT):
        return write_model(model, directory)
    safetensors.torch.save_model(model, str(directory / "model.safetensors"))


def default_load_model(model: nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place (tied weights stored once are fine)."""
    path = directory / "model.safetensors"
    if not path.exists():
        raise UserError(f"{directory}: no model.safetensors in this checkpoint")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    except RuntimeError as e:  # a tensor of another shape (torch's message: one line per tensor)
        raise UserError(f"{path}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"{path}: does not match the model (missing {sorted(missing)[:3]}, unexpected "
                        f"{unexpected[:3]}); was the run directory made with a different [model] config?")


def _hidden_matrices(model: nn.Module) -> set:
    """What Muon trains (nanochat's split): the weight matrices of ``nn.Linear`` layers with more than one row and
    column, except the output head and anything shared with an embedding (AdamW keeps those, norms and biases)."""
    embeddings = {p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return {m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and min(m.weight.shape) > 1
            and name.rsplit(".", 1)[-1] != "lm_head" and m.weight not in embeddings}


def _renumber(sd: dict, key: Callable) -> dict:
    """An optimizer state dict with every parameter key mapped through ``key`` (ids offset, or ids <-> FSDP names)."""
    return {"state": {key(k): v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [key(i) for i in g["params"]]} for g in sd["param_groups"]]}


class _Chained:
    """Muon + AdamW as one optimizer for the loop, the GradScaler and checkpoints: ``param_groups`` and the state
    dict list Muon's first, parameter ids numbered across both (the layout of a single optimizer's state dict)."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts

    @property
    def param_groups(self) -> list[dict]:  # (load_state_dict replaces each optimizer's group dicts)
        return [g for o in self.opts for g in o.param_groups]

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def _offsets(self) -> list[int]:
        sizes = [sum(len(g["params"]) for g in o.param_groups) for o in self.opts]
        return [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def state_dict(self) -> dict:
        parts = [_renumber(o.state_dict(), lambda i: b + i) for o, b in zip(self.opts, self._offsets())]
        return {"state": {k: v for p in parts for k, v in p["state"].items()},
                "param_groups": [g for p in parts for g in p["param_groups"]]}

    def load_state_dict(self, sd: dict) -> None:
        groups = list(sd["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups saved, {len(self.param_groups)} here")
        offsets = self._offsets()
        for o, b, end in zip(self.opts, offsets, offsets[1:]):
            mine, groups = groups[:len(o.param_groups)], groups[len(o.param_groups):]
            part = {"state": {k: v for k, v in sd["state"].items() if b <= k < end}, "param_groups": mine}
            o.load_state_dict(_renumber(part, lambda i: i - b))


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors tensors ``state.ID.NAME`` + JSON (groups, non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    return {"state": state, "param_groups": [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
                                             for g in meta["param_groups"]]}


def _copy_to(module: nn.Module, device: str) -> nn.Module:
    """An uninitialised copy of ``module`` on ``device`` ("meta": no memory), with tied weights still tied."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # swap in place: shared Parameters stay shared
    try:
        return copy.deepcopy(module).to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py, npst = random.getstate(), np.random.get_state()
    return {"torch_cpu": torch.get_rng_state(), **{f"cuda{i}": s for i, s in enumerate(cuda)}}, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}


def _set_rng_state(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py, n = js["python"], js["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    return next((t for t in tree_leaves(batch) if torch.is_tensor(t)), None)


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``stage`` on ``model`` (a GPT, or a wrapper such as policy + value
    head), writing everything under ``run_dir``. ``save_model`` / ``load_model(model, dir)`` write and read a
    checkpoint's weights; ``tokenizer`` goes into every checkpoint; ``run_config`` (``{section: {key: value}}``) is
    recorded; ``resume``: None = resume when ``run_dir/ckpt`` holds a checkpoint, True = require one, False = not."""

    def __init__(self, model: nn.Module, stage: Stage, cfg: TrainConfig, run_dir: str | Path, *,
                 tokenizer: Any = None, save_model: Optional[Callable[[nn.Module, Path], None]] = None,
                 load_model: Optional[Callable[[nn.Module, Path], None]] = None, run_config: Optional[dict] = None,
                 resume: Optional[bool] = None):
        self.cfg, self.stage, self.tokenizer, self.resume = cfg, stage, tokenizer, resume
        self.run_dir = Path(run_dir)
        self.ckpt_dir, self.best_dir = self.run_dir / "ckpt", self.run_dir / "best"
        self.save_model_fn, self.load_model_fn = save_model or default_save_model, load_model or default_load_model
        self.run_config = run_config if run_config is not None else {"train": cfg.to_dict()}

        self.device = runtime.pick_device(cfg.device)
        self.dtype = runtime.pick_dtype(cfg.dtype, self.device)  # auto: fp32 on CPUs without native bf16
        self.ddp = init_distributed(self.device)
        self.rank, self.world_size, _ = world_info()
        self.is_main = self.rank == 0
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.fsdp = self.ddp and cfg.parallel == "fsdp"
        self.model = (self._shard(model) if self.fsdp else model).to(self.device)  # the plain module: saved, evaluated
        if cfg.lora_r and not lora.adapted(model):  # the stages that support LoRA apply it to their model
            raise UserError(f"--lora_r: stage '{stage.name}' does not train LoRA adapters (sft, dpo and rm do)")
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=(self.dtype == torch.float16))

        self.step, self.elapsed, self.tokens_seen = 0, 0.0, 0  # optimizer steps, training seconds (all resumes), tokens
        self.best: dict[str, Any] = {"metric": None, "value": None, "step": None}
        self.last_eval, self.last_train = {}, {}  # the latest evaluation's and step's metrics
        self._stop_reason: Optional[str] = None
        self.schedule: Optional[dict] = None  # a time budget's decision: {"max_steps", "warmup_steps", ..., "for"}
        if hasattr(stage, "setup"):
            stage.setup(self)

    # ---- construction ----------------------------------------------------------------------------------------------

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        hidden = _hidden_matrices(self.model) if cfg.optimizer == "muon" else set()
        decay, no_decay, muon = [], [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (muon if p in hidden else decay if p.dim() >= 2 else no_decay).append(p)
        if not decay and not no_decay and not muon:
            raise UserError("the model has no trainable parameters (all have requires_grad=False)")
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == "muon":
            if not hasattr(torch.optim, "Muon"):
                raise UserError(f"train.optimizer = 'muon': torch {torch.__version__} has no torch.optim.Muon; "
                                "upgrade torch (2.9 or newer) or use optimizer = 'adamw'")
            groups = [g for g in groups if g["params"]]  # (a model may have no bias or norm)
        impl = cfg.optimizer_impl  # auto: fused is the fastest on CUDA and CPU (benchmarks/train_step.py --optim-only)
        impl = ("fused" if self.device.type in ("cuda", "cpu") else "foreach") if impl == "auto" else impl
        kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
        if not muon:
            return adamw
        # lr_scale: the schedule sets lr × lr_scale in every group, so Muon follows the same warm-up and decay
        return _Chained(torch.optim.Muon([{"params": muon, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                                         weight_decay=cfg.weight_decay), adamw)

    def _shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: each transformer block, then the root, keeps 1/N of its weights, grads and optimizer state a rank."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.dtype == torch.float16:  # GradScaler's inf check would see one rank's shard only
            raise UserError("train.parallel = fsdp: fp16 loss scaling is not supported on sharded gradients; "
                            "use --dtype bf16 or fp32")
        mp = MixedPrecisionPolicy()
        if self.device.type == "cuda" and self.dtype != torch.float32:  # bf16 compute, fp32 master weights + reduce
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        self._skeleton = _copy_to(model, "meta")  # the module's structure, for full-weight save / load
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def _wrap(self) -> nn.Module:
        model = self.model
        if self.ddp and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                              find_unused_parameters=self.cfg.ddp_find_unused)
        self._ddp_model = model  # its no_sync() (a compiled wrapper has none)
        return torch.compile(model) if self.cfg.compile else model

    def _check_grads(self) -> None:
        """After DDP's first backward: name the parameters the loss never used (DDP's own error is many lines)."""
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise UserError(f"torchrun: the loss of stage '{self.stage.name}' never uses {len(unused)} trainable "
                            f"parameter(s) ({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}), which DDP "
                            "cannot reduce: freeze them (requires_grad=False) or set train.ddp_find_unused = true")

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a checkpoint must share with the run that resumes it ('section.key' -> value; docs/internals.md)."""
        ident = {f"{s}.{k}": v for s, sec in self.run_config.items() if isinstance(sec, dict)
                 for k, v in sec.items() if not (s == "train" and k in RESUMABLE)}
        config = getattr(self.model, "config", None)
        if hasattr(config, "to_dict"):
            ident.update({f"model.{k}": v for k, v in config.to_dict().items()})
        ident["stage.fingerprint"] = getattr(self.stage, "fingerprint", None)
        return json.loads(json.dumps(ident, default=str))  # as read back from trainer_state.json

    def has_checkpoint(self) -> bool:
        return (self.ckpt_dir / "trainer_state.json").exists()

    def _gather(self, obj: Any) -> list:
        if not self.ddp:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _full_model(self) -> Optional[nn.Module]:
        """The model with all its weights on rank 0 (None elsewhere); FSDP gathers them (collective) into a CPU copy."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        full = copy.deepcopy(self._skeleton)
        full.load_state_dict(sd, assign=True)
        return full

    def _optimizer_state(self) -> dict:
        """The optimizer's state dict; under FSDP the full one on rank 0 (keyed by parameter index, as its own)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.model, getattr(self.optimizer, "opts", self.optimizer),  # Muon: both
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        index = {n: i for i, n in enumerate(n for g in sd["param_groups"] for n in g["params"])}
        return _renumber(sd, index.__getitem__)

    def _load_state(self, optimizer_sd: dict) -> None:
        """Load ``ckpt/`` weights and a full optimizer state dict; under FSDP each rank keeps its shards."""
        if not self.fsdp:
            self.load_model_fn(self.model, self.ckpt_dir)
            self.optimizer.load_state_dict(optimizer_sd)
            return
        from torch.distributed.checkpoint import state_dict as dcp

        full = _copy_to(self._skeleton, "cpu")
        self.load_model_fn(full, self.ckpt_dir)
        options = dcp.StateDictOptions(full_state_dict=True)
        dcp.set_model_state_dict(self.model, full.state_dict(), options=options)
        name = {p: n for n, p in self.model.named_parameters()}
        fqns = [name[p] for g in self.optimizer.param_groups for p in g["params"]]
        dcp.set_optimizer_state_dict(self.model, getattr(self.optimizer, "opts", self.optimizer),
                                     _renumber(optimizer_sd, fqns.__getitem__), options=options)

    def _write_weights(self, tmp: Path, model: nn.Module) -> None:
        self.save_model_fn(model, tmp)
        if self.tokenizer is not None:
            self.tokenizer.write_files(tmp / "tokenizer")

    def save_checkpoint(self) -> None:
        """Write ``run_dir/ckpt`` atomically (every rank must call this; rank 0 writes)."""
        model, opt_sd = self._full_model(), self._optimizer_state()  # (collectives under FSDP)
        all_rng = self._gather(_rng_state())
        stage_t = None
        if hasattr(self.stage, "state_tensors"):  # every rank's own tensors, as CPU copies (no shared storage)
            mine = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.stage.state_tensors().items()}
            stage_t = {f"rank{r}.{k}": v for r, t in enumerate(self._gather(mine)) for k, v in t.items()}
        if self.is_main:
            opt_t, opt_meta = _optimizer_tensors(opt_sd)
            state = {"step": self.step, "stage": self.stage.name, "elapsed_s": self.elapsed,
                     "tokens_seen": self.tokens_seen, "world_size": self.world_size, "best": self.best,
                     "last_eval": self.last_eval, "last_train": self.last_train, "train_config": self.cfg.to_dict(),
                     "run_config": self.run_config, "identity": self._identity(), "schedule": self.schedule,
                     "optimizer": opt_meta, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     "rng": [j for _, j in all_rng], "stage_state": self.stage.state_dict()}
            with atomic_dir(self.ckpt_dir) as tmp:
                self._write_weights(tmp, model)
                rng_t = {f"rank{r}.{k}": v for r, (t, _) in enumerate(all_rng) for k, v in t.items()}
                for name, tensors in {"optimizer": opt_t, "rng": rng_t, "stage": stage_t}.items():
                    if tensors is not None:  # (stage: only a stage with state_tensors)
                        safetensors.torch.save_file(tensors, str(tmp / f"{name}.safetensors"))
                write_json(tmp / "trainer_state.json", state)
        if self.ddp:
            torch.distributed.barrier()

    def save_best(self) -> None:
        model = self._full_model()
        if not self.is_main:
            return
        with atomic_dir(self.best_dir) as tmp:
            self._write_weights(tmp, model)
            write_json(tmp / "trainer_state.json", {"step": self.step, "stage": self.stage.name,
                                                    "metrics": self.last_eval, "run_config": self.run_config})

    def load_checkpoint(self) -> None:
        """Restore model, optimizer, scaler, RNG, stage position and counters from ``run_dir/ckpt``."""
        state = read_json(self.ckpt_dir / "trainer_state.json")
        if state.get("stage") != self.stage.name:
            raise UserError(f"{self.ckpt_dir}: this checkpoint was written by stage '{state.get('stage')}', "
                            f"not '{self.stage.name}'; use a new --out directory")
        old, new = state.get("identity"), self._identity()
        diff = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)] if old is not None else []
        if diff:
            shown = "; ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in diff[:3])
            raise UserError(f"{self.run_dir} holds another run ({shown}{'; ...' if len(diff) > 3 else ''}): start "
                            "over there with --restart (its checkpoint is replaced), or choose another --out")
        opt_t = safetensors.torch.load_file(str(self.ckpt_dir / "optimizer.safetensors"))
        try:
            self._load_state(_optimizer_from_tensors(opt_t, state["optimizer"]))
        except (ValueError, KeyError) as e:
            raise UserError(f"{self.ckpt_dir}: optimizer state does not match the model ({e})") from None
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        r = self.rank if self.rank < len(state["rng"]) else 0  # fewer processes wrote it: rank 0's state
        def mine(name: str) -> dict[str, torch.Tensor]:  # this rank's tensors of a per-rank file
            tensors = safetensors.torch.load_file(str(self.ckpt_dir / name))
            return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}.")}

        _set_rng_state(mine("rng.safetensors"), state["rng"][r])
        self.stage.load_state_dict(state.get("stage_state") or {})
        if hasattr(self.stage, "load_state_tensors") and (self.ckpt_dir / "stage.safetensors").exists():
            self.stage.load_state_tensors(mine("stage.safetensors"))
        self.step, self.elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        self.tokens_seen, self.schedule = int(state.get("tokens_seen", 0)), state.get("schedule")
        self.best = state.get("best") or self.best
        self.last_eval, self.last_train = state.get("last_eval") or {}, state.get("last_train") or {}
        if self.is_main:  # the lines logged after this checkpoint will be logged again (a line cut by a kill goes)
            keep = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= self.step]
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))

    # ---- logging and evaluation ------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        if not self.is_main:
            return
        try:
            plot_metrics(self.run_dir, list(getattr(self.stage, "plot_keys", []) or []))
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            print(f"warning: could not draw plots: {e}", file=sys.stderr)

    def evaluate(self) -> dict[str, float]:
        """Run the stage's evaluation (rank 0; every rank under FSDP), log it, refresh plots, and update ``best/``."""
        if not self.is_main and not self.fsdp:
            return {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), runtime.autocast(self.device, self.dtype):
            metrics = {k: float(v) for k, v in self.stage.evaluate(self.model).items()}
        if self.fsdp:  # every rank evaluated (the forwards are collective); all take rank 0's decisions
            metrics = self._gather(metrics)[0]
        self.model.train(was_training)
        if not metrics:
            return metrics
        self.last_eval = metrics
        self._log({"step": self.step, **metrics})
        key = getattr(self.stage, "best_metric", None) or ("val_loss" if "val_loss" in metrics else next(iter(metrics)))
        value, old = metrics.get(key), self.best.get("value")
        if value is not None and math.isfinite(value):
            if old is None or (value < old if getattr(self.stage, "best_mode", "min") == "min" else value > old):
                self.best = {"metric": key, "value": value, "step": self.step}
                if self.cfg.keep_best:
                    self.save_best()
        self._plot()
        return metrics

    # ---- the loop --------------------------------------------------------------------------------------------------

    def _install_signals(self) -> dict:
        """Ctrl-C / SIGTERM finish the step and checkpoint (a second Ctrl-C stops at once); returns the old handlers."""
        def handler(signum, frame):
            if self._stop_reason == "interrupt":
                raise KeyboardInterrupt
            self._stop_reason = "interrupt"
            if self.is_main:
                print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit now)",
                      file=sys.stderr)

        main = threading.current_thread() is threading.main_thread()  # (the only thread that may set handlers)
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}

    def _schedule(self) -> Optional[TrainConfig]:
        """The schedule's config: ``cfg``, resized by a time budget's decision; None while a budget is undecided."""
        cfg, s = self.cfg, self.schedule
        if not cfg.max_minutes:
            return cfg
        if s is None or s["for"] != [cfg.max_steps, cfg.max_minutes]:  # a resumed run changed them: decide again
            return None
        return cfg.model_copy(update={k: s[k] for k in ("max_steps", "warmup_steps", "eval_interval", "ckpt_interval")
                                      if k in s})

    def _fit_budget(self, per_step: float) -> TrainConfig:
        """Size the schedule to the steps that fit the budget left; space pauses by one's cost (docs/internals.md)."""
        cfg, pause = self.cfg, 0.0
        if cfg.eval_interval:
            t = time.time()
            self._pause()
            pause = time.time() - t
        elapsed = self.elapsed + pause
        if self.ddp:  # every rank must take the same decision
            t = torch.tensor([per_step, elapsed, pause], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            per_step, elapsed, pause = t.tolist()
        budget = 60 * cfg.max_minutes
        pauses = max(1, int((PAUSE_SHARE * budget - pause) / pause)) if pause else 0  # the final one included
        fit = self.step + int(max(0.0, budget - elapsed - pauses * pause) / max(per_step, 1e-9))
        total = max(self.step, min(cfg.max_steps, fit))
        warmup = min(cfg.warmup_steps, math.ceil(cfg.warmup_steps * total / cfg.max_steps))
        every = max(cfg.eval_interval, math.ceil(total / pauses)) if pauses else 0
        self.schedule = {"max_steps": total, "warmup_steps": warmup, "eval_interval": every,
                         "ckpt_interval": max(cfg.ckpt_interval, every) if cfg.ckpt_interval else 0,
                         "for": [cfg.max_steps, cfg.max_minutes]}
        if self.is_main:
            tqdm.write(f"{self.stage.name}: time budget {cfg.max_minutes:g} min at {per_step:.3g} s/step: the run will "
                       f"take {total} steps" + (f" (warm-up {warmup}; max_steps {cfg.max_steps} do not fit)"
                                                if total < cfg.max_steps else " (max_steps)")
                       + (f", evaluating every {every} ({pause:.2g} s each)" if every else ""), file=sys.stderr)
        return self._schedule()

    def _pause(self) -> None:
        """Evaluate (rank 0, then every rank waits), print the metrics, checkpoint."""
        self.evaluate()
        if self.ddp:
            torch.distributed.barrier()
        if self.last_eval and self.is_main:
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()),
                       file=sys.stderr)
        self.save_checkpoint()

    def _accumulate(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        """Forward and backward of every micro-batch of ``step``: this rank's summed loss, summed metrics, tokens."""
        cfg = self.cfg
        loss_sum, metric_sums, n_tokens = torch.zeros((), device=self.device), {}, 0
        for micro in range(cfg.grad_accum):
            batch = self.stage.get_batch(step, micro)
            first = _first_tensor(batch)
            if hasattr(self.stage, "tokens_in_batch"):
                n_tokens += int(self.stage.tokens_in_batch(batch))
            elif first is not None:
                n_tokens += first.numel()
            if self._seq_len is None and first is not None and first.dim() >= 2:
                self._seq_len = first.shape[-1]  # (for MFU)
            batch = tree_map(lambda t: t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t, batch)
            # DDP all-reduces in the last micro-batch's backward only; FSDP reduce-scatters every one (no whole grads)
            sync = (not self.ddp) or self.fsdp or micro == cfg.grad_accum - 1
            with nullcontext() if sync else self._ddp_model.no_sync():
                with runtime.autocast(self.device, self.dtype):
                    try:
                        loss, metrics = self.stage.loss(model, batch)
                    except RuntimeError as e:  # a parameter unused at some later step only
                        if "finished reduction in the prior iteration" not in str(e):
                            raise
                        raise UserError(f"torchrun: step {step + 1}: the loss of stage '{self.stage.name}' did not "
                                        "use every trainable parameter at the previous step; set "
                                        "train.ddp_find_unused = true") from None
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        return loss_sum, metric_sums, n_tokens

    def fit(self) -> dict:
        """Train to ``max_steps`` (or what fits the time budget), resuming as ``resume`` says; returns the metrics."""
        cfg = self.cfg
        if self.resume is True and not self.has_checkpoint():
            raise UserError(f"{self.ckpt_dir}: no checkpoint to resume from")
        if self.resume is not False and self.has_checkpoint():
            self.load_checkpoint()
            if self.is_main:
                print(f"resuming {self.stage.name} from {self.ckpt_dir} at step {self.step}", file=sys.stderr)
        else:
            runtime.seed_everything(cfg.seed + self.rank)
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "metrics.jsonl").write_text("")
        if self.is_main:
            atomic_write_text(self.run_dir / "run_config.toml", dump_toml({**self.run_config, "train": cfg.to_dict()}))

        model = self._wrap().train()
        flops_per_token = getattr(self.model, "flops_per_token", None)
        peak = runtime.peak_flops(self.device, self.dtype)
        old_handlers = self._install_signals()
        sched = self._schedule()
        total = (sched or cfg).max_steps
        bar = tqdm(total=total, initial=self.step, desc=self.stage.name, dynamic_ncols=True, file=sys.stderr,
                   disable=not (cfg.progress and self.is_main and sys.stderr.isatty()) or bool(os.environ.get("CI")))
        t_start, step0 = time.time() - self.elapsed, self.step
        t_log, tokens_log, step_log, loss_log = time.time(), self.tokens_seen, self.step, 0.0  # at/since the last log
        self._seq_len = None
        try:
            while self.step < total:
                step = self.step
                lr = lr_at(sched or cfg, step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss_sum, metric_sums, n_tokens = self._accumulate(model, step)
                if self.ddp and not cfg.ddp_find_unused and self.step == step0:
                    self._check_grads()

                # one all-reduce a step: mean loss, metrics (same keys on all ranks; NaN anywhere stops all), stop flag
                if cfg.max_minutes and time.time() - t_start >= 60 * cfg.max_minutes:
                    self._stop_reason = self._stop_reason or "time"
                keys = sorted(metric_sums)
                packed = torch.tensor([float(loss_sum / cfg.grad_accum), float(bool(self._stop_reason)),
                                       *(metric_sums[k] for k in keys)], dtype=torch.float64, device=self.device)
                if self.ddp:
                    torch.distributed.all_reduce(packed)
                step_loss, stop, *sums = (packed / self.world_size).tolist()
                if not math.isfinite(step_loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    last = (f"the last good checkpoint is {self.ckpt_dir} (step "
                            f"{read_json(self.ckpt_dir / 'trainer_state.json')['step']})" if self.has_checkpoint()
                            else "no checkpoint was written yet")
                    raise TrainingDiverged(f"step {step + 1}: the training loss is {step_loss} (not finite); stopped "
                                           f"before updating the weights; {last}. Try a lower lr, a longer warmup, "
                                           "grad_clip, or dtype fp32")

                grad_norm = None
                if cfg.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += n_tokens * self.world_size
                self.elapsed = time.time() - t_start
                if sched is None:  # a time budget: time steps after this process's first (allocation, compile)
                    if self.step == step0 + 1:
                        t_first = time.time()
                    elif self.step == step0 + 1 + MEASURED_STEPS:
                        t_pause = time.time()
                        sched = self._fit_budget((t_pause - t_first) / MEASURED_STEPS)
                        bar.total = total = sched.max_steps
                        t_log += time.time() - t_pause  # (its timed evaluation is no training time)

                train_metrics = {k: v / cfg.grad_accum for k, v in zip(keys, sums)}
                self.last_train = {"loss": step_loss, **train_metrics}
                loss_log += step_loss
                if hasattr(self.stage, "on_step_end"):
                    self.stage.on_step_end(self.step, self.model, self.last_train)
                stop = stop or (not self.ddp and self._stop_reason)  # (under DDP the ranks agree at the next step)

                if (cfg.log_interval and self.step % cfg.log_interval == 0) or self.step == total or stop:
                    tok_s = (self.tokens_seen - tokens_log) / max(time.time() - t_log, 1e-9)
                    record = {"step": self.step, "loss": step_loss, "lr": lr, **train_metrics,
                              "tok_per_s": round(tok_s, 1), "elapsed_s": round(self.elapsed, 2)}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    if flops_per_token is not None and peak and tok_s > 0:  # MFU only against a known peak
                        record["mfu"] = round(flops_per_token(self._seq_len) * tok_s / (peak * self.world_size), 4)
                    self._log(record)
                    post = {"loss": f"{loss_log / (self.step - step_log):.4f}", "tok/s": f"{tok_s:,.0f}"}
                    if "mfu" in record:
                        post["mfu"] = f"{100 * record['mfu']:.1f}%"
                    bar.set_postfix(post, refresh=False)
                    t_log, tokens_log, step_log, loss_log = time.time(), self.tokens_seen, self.step, 0.0
                bar.update(1)

                t_pause = time.time()
                every = sched or cfg  # (a time budget spaces them)
                if (every.eval_interval and self.step % every.eval_interval == 0) or self.step == total or stop:
                    self._pause()
                elif every.ckpt_interval and self.step % every.ckpt_interval == 0:
                    self.save_checkpoint()
                t_log += time.time() - t_pause  # tokens/s counts training time only
                if stop:
                    break
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

        if cfg.max_minutes and self.is_main:
            print(f"{self.stage.name}: reached step {self.step}, {self.tokens_seen:,} tokens in "
                  f"{self.elapsed / 60:.2f} min ({self.tokens_seen / max(self.elapsed, 1e-9):,.0f} tokens/s)",
                  file=sys.stderr)
        if self._stop_reason == "interrupt":
            if self.is_main:
                print(f"stopped at step {self.step}; checkpoint saved in {self.ckpt_dir} "
                      "(run the same command again to resume)", file=sys.stderr)
            raise KeyboardInterrupt
        self._plot()
        result = {"step": self.step, **{f"train_{k}" if k == "loss" else k: v for k, v in self.last_train.items()},
                  **self.last_eval, "tokens": self.tokens_seen, "elapsed_s": round(self.elapsed, 2),
                  "tok_per_s": round(self.tokens_seen / max(self.elapsed, 1e-9), 1)}
        if self.best.get("value") is not None:
            result.update({"best_" + self.best["metric"]: self.best["value"], "best_step": self.best["step"]})
        return result

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:  # ``with Trainer(...) as trainer:`` closes it however the block ends
        self.close()

    def close(self) -> None:
        """Leave the process group (call once at the end of a torchrun program)."""
        if self.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
