"""One place that decides device, precision and compilation (CPU / CUDA / MPS), and seeds everything."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu. Under torchrun each rank takes ``cuda:LOCAL_RANK``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda was asked for but no CUDA GPU is available")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), oneDNN's answer. Without them
    PyTorch emulates bf16 and autocast is slower than fp32 (``benchmarks/README.md``), so ``auto`` picks fp32."""
    if (forced := os.environ.get("POCKETGPT_CPU_BF16")) in ("0", "1"):
        return forced == "1"
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 where the hardware runs it fast (CUDA with bf16, a CPU with AVX512-BF16/AMX), else fp16 on
    older CUDA GPUs, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if (dt := DTYPES.get(name)) is None:
        raise UserError(f"dtype: unknown precision {name!r} (auto, fp32, bf16, fp16)")
    if dt == torch.float16 and device.type == "cpu":
        raise UserError("dtype: fp16 autocast needs a CUDA GPU; use bf16 or fp32 on a CPU")
    return dt


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for the forward pass (a no-op for fp32)."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# dense matmul peaks from the data sheets, FLOP/s: (fp32 without TF32, bf16/fp16); the first name found is used
GPU_PEAK_FLOPS = {"H100 PCIe": (51e12, 756e12), "H100": (67e12, 989e12), "H200": (67e12, 989e12),
                  "A100": (19.5e12, 312e12)}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak matmul FLOP/s that MFU is reported against: ``POCKETGPT_PEAK_FLOPS`` when set, else a CUDA GPU's
    data-sheet figure (``GPU_PEAK_FLOPS``); None (no MFU) for a CPU or another GPU."""
    if os.environ.get("POCKETGPT_PEAK_FLOPS"):
        return float(os.environ["POCKETGPT_PEAK_FLOPS"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v[dtype != torch.float32] for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
