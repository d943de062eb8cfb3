"""pocketgpt: from raw text to a GPT chat model, built from scratch. The public names are imported lazily, so that
e.g. ``pocketgpt prepare`` never pays for importing torch."""

import importlib

__version__ = "0.1.0"

_LAZY = {"GPT": "model", "GPTConfig": "model", "KVCache": "model", "UserError": "errors", "Tokenizer": "tokenizer",
         "SamplingParams": "engine", "generate": "engine", "load_model": "checkpoint", "save_model": "checkpoint"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pocketgpt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
