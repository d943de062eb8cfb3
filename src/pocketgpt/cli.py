"""The ``pocketgpt`` command: a thin argparse front over the library.

Each subcommand lives with the code it drives: the module listed in ``COMMANDS`` defines
``configure_cli(name, parser)``, which adds the options and sets ``parser.set_defaults(func=...)``; the function
receives the parsed ``argparse.Namespace``. A ``UserError`` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name, module, one-line help (in pipeline order)
COMMANDS = [
    ("tokenizer", "pocketgpt.tokenizer", "train a tokenizer (bpe, char, word, unigram) or inspect one"),
    ("prepare", "pocketgpt.data", "tokenize text/JSONL into train/val token shards"),
    ("pretrain", "pocketgpt.train.pretrain", "pretrain a GPT on prepared shards (TOML presets, resume, DDP)"),
    ("eval", "pocketgpt.train.pretrain", "print loss and perplexity of a checkpoint on a data split"),
    ("sample", "pocketgpt.engine", "generate text from a checkpoint (streams to the terminal)"),
    ("sft", "pocketgpt.train.sft", "supervised chat fine-tuning on conversation JSONL"),
    ("chat", "pocketgpt.chat", "talk to a chat model in the terminal"),
    ("pairs", "pocketgpt.tasks", "preference pairs from a model's checked replies to a checkable task"),
    ("rm", "pocketgpt.train.reward", "train a reward model on preference pairs (or score conversations)"),
    ("ppo", "pocketgpt.train.ppo", "RLHF with PPO against a reward model or a Python reward function"),
    ("dpo", "pocketgpt.train.dpo", "direct preference optimisation on preference pairs"),
    ("grpo", "pocketgpt.train.grpo", "group relative policy optimisation on a verifiable task"),
    ("serve", "pocketgpt.serve", "OpenAI-compatible HTTP API and web chat page"),
    ("export", "pocketgpt.export", "export a checkpoint as a Hugging Face GPT-2 / Llama directory"),
    ("speedrun", "pocketgpt.speedrun", "the whole pipeline on bundled data, with a report card"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only=NAME``) one whose NAME subcommand alone is configured — so running one command
    imports only its own module (``pocketgpt prepare`` never imports torch); ``only=""`` configures none (help)."""
    from . import __version__

    # no abbreviations anywhere: `--max_step` must not silently mean `--max_steps` (tokenizer.py does the same)
    parser = argparse.ArgumentParser(
        prog="pocketgpt", allow_abbrev=False,
        description="pocketgpt: from raw text to a GPT chat model. Run 'pocketgpt COMMAND --help' for details.",
    )
    parser.add_argument("--version", action="version", version=f"pocketgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           allow_abbrev=False)
        if only is None or only == name:
            importlib.import_module(module).configure_cli(name, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    _one_line_warnings()
    names = {name for name, _, _ in COMMANDS}
    chosen = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=chosen if chosen in names else "")
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"pocketgpt {args.command}: error: {_unknown_argument(parser, argv, extra)}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except UserError as e:
        print(f"pocketgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pocketgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into e.g. `head` that closed early: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _one_line_warnings() -> None:
    """Library warnings (a small vocabulary, a prompt cut to the context) as one line each, without source lines."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"pocketgpt: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def _unknown_argument(parser: argparse.ArgumentParser, argv: list[str], extra: list[str]) -> str:
    """One line for the first argument no parser took, with a did-you-mean among the (sub)command's options."""
    from .config import did_you_mean

    for a in argv:  # descend to the innermost subcommand named on the line (e.g. `tokenizer train`)
        subs = [x for x in parser._actions if isinstance(x, argparse._SubParsersAction)]
        if subs and a in subs[0].choices:
            parser = subs[0].choices[a]
    flag = next((a for a in extra if a.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {extra[0]!r}"
    flag = flag.split("=", 1)[0]
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    return f"{flag}: unknown option{did_you_mean(flag, options)}"


if __name__ == "__main__":
    sys.exit(main())
