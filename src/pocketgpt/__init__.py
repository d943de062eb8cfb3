"""pocketgpt: from raw text to a GPT chat model, built from scratch.

Public API::

    from pocketgpt import GPT, GPTConfig, Tokenizer, generate
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .model import GPT, GPTConfig, KVCache  # noqa: E402

__all__ = ["GPT", "GPTConfig", "KVCache", "UserError", "Tokenizer", "generate", "stream_generate"]


def __getattr__(name):  # lazy: importing the model should not pull in tokenizers or the engine
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    if name in ("generate", "stream_generate"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pocketgpt' has no attribute {name!r}")
