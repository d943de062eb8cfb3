"""pocketgpt: from raw text to a GPT chat model, built from scratch.

Public API::

    from pocketgpt import GPT, GPTConfig, Tokenizer, generate

Names are imported lazily, so that e.g. ``pocketgpt prepare`` never pays for importing torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "GPT": "model",
    "GPTConfig": "model",
    "KVCache": "model",
    "UserError": "errors",
    "Tokenizer": "tokenizer",
    "generate": "engine",
    "stream_generate": "engine",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pocketgpt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
