"""The ``pocketgpt`` command: ``COMMANDS``, thin calls that import what they need (``prepare`` never imports torch)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

from .errors import UserError


def _rank0() -> bool:
    from .train.trainer import world_info

    return world_info()[0] == 0  # under torchrun rank 0 reports


def _training(p, module: str, run, *, out: str | None, default_config: str | None = None, aliases=None) -> None:
    """``--out``, ``--resume`` / ``--restart`` and one option per field of the stage ``module``'s ``SECTIONS``."""
    from .config import add_config_arguments

    sections = importlib.import_module(module).SECTIONS
    p.add_argument("--out", default=out, metavar="RUN", help=f"run directory (default {out or 'runs/CONFIG_NAME'}); "
                                                             "the model ends up in RUN/ckpt")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in RUN/ckpt to resume from (by default a run resumes when one exists)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in RUN/ckpt and start over")
    add_config_arguments(p, sections, default_config=default_config, aliases=aliases)
    p.set_defaults(func=run, sections=sections)


def _device(p, dtype: str = "fp32", dtype_help: str = "weights precision: fp32, bf16, fp16 (default fp32)") -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--dtype", default=dtype, help=dtype_help)


def _load(args, **kw):
    """The command's ``RunConfig``, and the Trainer's ``resume``: True (required), False (start over) or None."""
    from .config import load_config

    if args.resume and args.restart:
        raise UserError("--resume and --restart exclude each other")
    cfg = load_config(args.config, args.config_overrides, args.sections, **kw)
    return cfg, True if args.resume else (False if args.restart else None)


def _done(args, line: str) -> int:
    if _rank0():
        print(f"{line}\nchat with it: pocketgpt chat --ckpt {Path(args.out) / 'ckpt'}")
    return 0


def _text_inputs(p, inputs: str) -> None:
    """The input options ``tokenizer train`` and ``prepare`` share (both read documents with ``collect_documents``)."""
    from .records import BUILTINS
    from .tokenizer import KINDS

    p.add_argument(inputs, nargs="*", help=".txt, .txt.gz, .jsonl(.gz) files or folders")
    p.add_argument("--builtin", action="append", default=[], metavar="NAME",
                   help=f"a bundled corpus as input ({', '.join(BUILTINS)}); may repeat")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default text; a list of chat "
                                                  "messages is joined)")
    p.add_argument("--encoding", default="utf-8", help="input text encoding (default utf-8)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="undecodable bytes: error (strict, default) or U+FFFD (replace)")
    p.add_argument("--kind", default="bpe", choices=KINDS, help="tokenizer kind (default bpe)")


def _tokenizer(p) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer on text files", allow_abbrev=False,
                       description="Train a tokenizer on text files (.txt, .txt.gz, .jsonl with --field, folders).")
    _text_inputs(t, "files")
    t.add_argument("--vocab-size", type=int, help="total vocabulary incl. special tokens (required except for char)")
    t.add_argument("--min-frequency", type=int, default=0, help="drop pieces seen fewer times (bpe, word)")
    t.add_argument("--out", required=True, help="output directory (written atomically)")
    t.set_defaults(func=_tokenizer_train)
    e = sub.add_parser("encode", help="show the tokens of a text", allow_abbrev=False,
                       description="Show the token ids/pieces of a text.")
    e.add_argument("text", help="text to encode")
    e.add_argument("--tokenizer", required=True, help="tokenizer directory (or a checkpoint directory)")
    e.add_argument("--allow-special", action="store_true", help="turn literal <|...|> strings into special ids")
    e.set_defaults(func=_tokenizer_encode)
    p.set_defaults(func=lambda args: p.print_help() or 2)  # no ACTION


def _tokenizer_train(args) -> int:
    from .data import collect_documents
    from .tokenizer import Tokenizer

    if not args.files and not args.builtin:
        raise UserError("give input FILES or --builtin NAME")
    docs, _ = collect_documents(args.files, builtins=args.builtin, field=args.field, encoding=args.encoding,
                                errors=args.errors)
    tok = Tokenizer.train(args.kind, docs, args.vocab_size, min_frequency=args.min_frequency,
                          show_progress=sys.stderr.isatty() and not os.environ.get("CI"))
    tok.save(args.out)
    print(f"trained {args.kind} tokenizer, vocab size {tok.vocab_size}, saved to {args.out}")
    return 0


def _tokenizer_encode(args) -> int:
    from .tokenizer import load_tokenizer_for

    tok = load_tokenizer_for(args.tokenizer)
    ids = tok.encode(args.text, allow_special=args.allow_special)
    print(f"{len(ids)} tokens: {ids}")
    print(" | ".join(repr(tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace"))[1:-1] for i in ids))
    return 0


def _prepare(p) -> None:
    _text_inputs(p, "inputs")
    p.add_argument("--out", required=True, help="output directory for train.bin / val.bin / meta.json")
    p.add_argument("--tokenizer", help="tokenizer (or checkpoint) directory; default: one trained on the inputs with "
                                       "--kind / --vocab-size, saved in OUT/tokenizer/")
    p.add_argument("--vocab-size", type=int, help="of the tokenizer trained without --tokenizer (default 4096; char: "
                                                  "every character)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents for val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="fraction of documents for test (default 0)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document split (default 1337)")
    p.add_argument("--split", default="random", choices=["random", "tail"],
                   help="held-out documents: a seeded random choice (default), or the last ones (tail)")
    p.add_argument("--raw", action="store_true", help="the text byte-for-byte (no cleaning, no <|endoftext|>); with "
                                                      "--split tail, val is the last characters (nanoGPT's split)")
    p.add_argument("--split-sentences", action="store_true", help="each sentence on its own line (.!? and 。！？…)")
    p.add_argument("--force", action="store_true", help="overwrite OUT even if it holds another tokenizer's shards")
    p.set_defaults(func=_prepare_run)


def _prepare_run(args) -> int:
    from .data import prepare

    if not args.inputs and not args.builtin:
        raise UserError("give INPUTS (files or folders) or --builtin NAME")
    vocab = 4096 if args.vocab_size is None and args.tokenizer is None and args.kind != "char" else args.vocab_size
    prepare(args.inputs, args.out, args.tokenizer, builtins=args.builtin, vocab_size=vocab,
            **{k: getattr(args, k) for k in ("field", "val_fraction", "test_fraction", "seed", "split_sentences",
                                             "encoding", "errors", "kind", "split", "raw", "force")})
    return 0


def _pretrain(p) -> None:
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from these weights (fresh optimizer); hf:NAME for a Hugging Face Hub model")
    _training(p, "pocketgpt.train.pretrain", _pretrain_run, out=None)


def _pretrain_run(args) -> int:
    from .data import check_tokenizer
    from .train.pretrain import build_pretrain
    from .train.trainer import Trainer, world_info

    cfg, resume = _load(args)
    out = Path(args.out) if args.out else Path("runs") / (Path(cfg.path).stem if cfg.path else "pretrain")
    model, stage, tokenizer = build_pretrain(cfg, out, init=args.init)
    if resume is not False and (out / "ckpt").is_dir():
        check_tokenizer(out / "ckpt", cfg["data"].dir, fix="start over with --restart, or choose another --out")
    rank, world, _ = world_info()
    if rank == 0:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, {world} process(es), run dir {out}",
              file=sys.stderr)
    with Trainer(model, stage, cfg["train"], out, tokenizer=tokenizer, run_config=cfg.to_dict(),
                 resume=resume) as trainer:
        result = trainer.fit()
    if rank == 0:
        parts = [f"step {result['step']}", f"{result['tokens']:,} tokens"] + [
            f"{k} {result[k]:.4f}" for k in ("train_loss", "val_loss", "val_ppl", "val_bpb") if k in result]
        print("done: " + ", ".join(parts + [f"{result['tok_per_s']:,.0f} tok/s"]))
        print(f"final model: {out / 'ckpt'}" + (f"   best val: {out / 'best'}" if (out / "best").exists() else ""))
    return 0


def _eval(p) -> None:
    p.add_argument("ckpt", nargs="?", help="checkpoint directory (e.g. RUN/ckpt or RUN/best); or --ckpt")
    p.add_argument("--ckpt", dest="ckpt_opt", metavar="CKPT", help=argparse.SUPPRESS)
    p.add_argument("--data", help="data directory made by 'pocketgpt prepare': loss and perplexity of a split")
    p.add_argument("--split", default="val", help="train | val | test (default: val)")
    p.add_argument("--text", metavar="FILE", help="a text file: loss and bits per byte (compares tokenizers)")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (pip install 'pocketgpt[eval]')")
    p.add_argument("--include_path", "--include-path", metavar="DIR", help="folder of local lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="at most N items per task (a fraction if < 1)")
    p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None)
    p.add_argument("--out", metavar="FILE.json", help="also write the results here (--tasks, --text)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--max_batches", "--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--block_size", "--block-size", type=int, default=None, help="window (default: model context)")
    _device(p, "auto", "auto | fp32 | bf16 | fp16")
    p.set_defaults(func=_eval_run)


def _eval_run(args) -> int:
    from . import evaluate
    from .io import write_json
    from .train.pretrain import evaluate_checkpoint

    ckpt = args.ckpt or args.ckpt_opt
    if not ckpt or sum(x is not None for x in (args.data, args.text, args.tasks)) != 1:
        raise UserError("give a checkpoint and one of --data DIR, --text FILE or --tasks T1,T2")
    if args.data is not None:
        m = evaluate_checkpoint(ckpt, args.data, args.split, batch_size=args.batch_size, max_batches=args.max_batches,
                                block_size=args.block_size, device=args.device, dtype=args.dtype)
        print(f"{args.split} loss {m['val_loss']:.4f}  perplexity {m['val_ppl']:.2f}"
              + (f"  bits/byte {m['val_bpb']:.4f}" if "val_bpb" in m else ""))
        return 0
    if args.text:
        res = evaluate.text_metrics(ckpt, args.text, args.batch_size, args.device)
        print(f"{args.text}: loss {res['loss']:.4f}  bits/byte {res['bits_per_byte']:.4f}  "
              f"({res['tokens']} tokens, {res['bytes']} bytes)")
    else:
        res = evaluate.run_tasks(ckpt, args.tasks, args.include_path, args.limit, args.num_fewshot,
                                 args.batch_size, args.device)
        for task, m in res.items():
            print(f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)) +
                  f"  (n={m['n']})")
    if args.out:
        write_json(args.out, res)
    return 0


def _sampling(p, d: dict) -> None:
    """The options ``sample`` and ``chat`` share, with the command's defaults ``d``."""
    p.add_argument("--ckpt", required=True, help="checkpoint directory (pocketgpt or Hugging Face GPT-2/Llama), or a "
                                                 "run directory holding one")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help="longest reply in tokens (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=d["top_k"],
                   help="sample from the k most likely tokens; 0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling mass in (0, 1] (default off)")
    p.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"],
                   help="> 1 discourages repeating tokens, 1 = off (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    _device(p)


def _sample(p) -> None:
    _sampling(p, dict(max_new_tokens=200, temperature=0.8, top_k=0, top_p=None, repetition_penalty=1.0))
    p.add_argument("--prompt", default=None, help="prompt text (default: start from <|endoftext|>)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p × the top probability")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1 = off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty (default 1)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3,
                   help="beams never repeat an n-gram this long (default 3: small models' beams loop; 0 = off)")
    p.add_argument("--n", type=int, default=1, help="number of samples (default 1)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.set_defaults(func=_sample_run)


def _sample_run(args) -> int:
    from .checkpoint import load_checkpoint
    from .engine import SamplingParams, generate

    if args.n < 1:
        raise UserError(f"--n: must be at least 1, got {args.n}")
    model, tokenizer = load_checkpoint(args.ckpt, args.device, args.dtype)
    eot = tokenizer.special_ids.get("<|endoftext|>")
    prompt = tokenizer.encode(args.prompt) if args.prompt else []
    if not prompt:
        if eot is None:
            raise UserError("--prompt: " + ("encodes to no tokens" if args.prompt else
                                            "this tokenizer has no <|endoftext|> token; give a prompt"))
        prompt = [eot]
    options = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "num_beams", "length_penalty", "no_repeat_ngram_size", "stop")
    params = SamplingParams(stop_ids=eot, **{k: getattr(args, k) for k in options})
    for i in range(args.n):
        print((f"--- sample {i + 1} ---\n" if args.n > 1 else "") + (args.prompt or ""), end="", flush=True)
        seed = None if args.seed is None else args.seed + i
        for piece in generate(model, [prompt], params, tokenizer=tokenizer, stream=True, seed=seed):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0


def _chat(p) -> None:
    from .chat import CHAT_DEFAULTS

    _sampling(p, {**CHAT_DEFAULTS, "max_new_tokens": 256})
    p.add_argument("--system", default=None, help="system message")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "With stdin not a terminal, reads one message per line and prints one reply per line.\n\n" + CHAT_HELP
    p.set_defaults(func=_chat_run)


def _chat_run(args) -> int:
    from .chat import ChatSession
    from .checkpoint import find_checkpoint, load_checkpoint

    model, tokenizer = load_checkpoint(args.ckpt, args.device, args.dtype, chat=True)
    for flag, bad, rule in (("max-new-tokens", args.max_new_tokens < 1, "at least 1"),
                            ("temperature", args.temperature < 0, ">= 0 (0 = greedy)"),
                            ("repetition-penalty", not args.repetition_penalty > 0, "> 0 (1 = off)")):
        if bad:
            raise UserError(f"--{flag}: must be {rule}")
    session = ChatSession(model, tokenizer, system=args.system, temperature=args.temperature, top_k=args.top_k or None,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets U+FFFD, not a traceback
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    # a terminal: prompts and notes on stderr, line editing; piped: one message per input line, one reply per line out
    interactive = sys.stdin.isatty()
    say = partial(print, file=sys.stderr) if interactive else lambda *_: None
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input(), wide characters included
        say(f"pocketgpt chat: {find_checkpoint(args.ckpt)} ({model.num_params() / 1e6:.1f}M parameters, "
            f"{model.config.block_size}-token context). /help for commands, /exit or Ctrl-D to quit.")
    lines = None if interactive else io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    while True:
        try:
            line = input("you> ") if interactive else next(lines, None)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:
            say()
            return 0
        line = line.strip()
        if line.startswith("/"):
            if not _chat_command(session, line, say):
                return 0
        elif line:
            print("bot> " if interactive else "", end="", flush=True)
            try:
                for piece in session.reply(line):
                    print(piece if interactive else piece.replace("\r", " ").replace("\n", " "), end="", flush=True)
            except KeyboardInterrupt:
                if not interactive:  # piped, an interrupt ends the command
                    raise
                say("\n(interrupted)")
            print(flush=True)
            for note in session.notes:
                say(note)
            session.notes.clear()


CHAT_HELP = """commands:
  /reset            forget the conversation (keeps the system message)
  /system TEXT      set the system message (empty TEXT removes it)
  /temperature X    sampling temperature (0 = greedy)
  /history          show the conversation so far
  /help             this help
  /exit             quit (Ctrl-D too)"""


def _chat_command(session, line: str, say) -> bool:
    """Run a /command (``say`` its confirmations); return False to quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/reset":
        session.reset()
        say("(conversation reset)")
    elif cmd == "/system":
        session.system = arg or None
        say(f"(system message {'set' if arg else 'removed'})")
    elif cmd == "/temperature":
        try:
            t = float(arg)
        except ValueError:
            t = math.nan
        if not t >= 0:  # NaN too
            print(f"/temperature: expected a number >= 0, got {arg!r}", file=sys.stderr)
            return True
        session.temperature = t
        say(f"(temperature {t:g})")
    elif cmd == "/history":
        print("\n".join(f"[{m['role']}] {m['content']}" for m in session.conversation()) or "(empty conversation)",
              file=sys.stderr)
    elif cmd == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        print(f"unknown command {cmd} (try /help)", file=sys.stderr)
    return True


# a fine-tune's [train] defaults where the config file / command line says nothing (not a pretraining's)
SFT_TRAIN = dict(max_steps=300, batch_size=16, lr=1e-4, min_lr=1e-5, warmup_steps=20, weight_decay=0.0,
                 eval_interval=50, eval_batches=20, ckpt_interval=100, log_interval=10)
DPO_TRAIN = dict(max_steps=200, batch_size=8, lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0,
                 schedule="cosine", eval_interval=25, eval_batches=20, ckpt_interval=50, log_interval=5)


def _sft_run(args) -> int:
    from .train.sft import run_sft

    rc, resume = _load(args, defaults={"train": SFT_TRAIN})
    sft = rc["sft"]
    if not sft.init:
        raise UserError("--init: required (a pocketgpt checkpoint, a Hugging Face directory or hf:NAME)")
    if not sft.data:
        raise UserError("--data: required (conversation JSONL files or bundled corpus names)")
    result = run_sft(sft.init, args.out, sft, rc["train"], run_config=rc.to_dict(), resume=resume)
    line = f"sft: done at step {result['step']}"
    if (val := result.get("val_loss")) is not None:
        line += f", held-out assistant-token loss {val:.4f} (ppl {result.get('val_ppl', math.exp(min(val, 50))):.2f})"
    return _done(args, line)


def _dpo_run(args) -> int:
    from .train.dpo import run_dpo

    rc, resume = _load(args, defaults={"train": DPO_TRAIN})
    if not rc["dpo"].data:
        raise UserError("--data: required (preference pairs JSONL or the bundled name 'prefs')")
    result = run_dpo(rc["dpo"], args.out, rc["train"], run_config=rc.to_dict(), resume=resume)
    line = f"dpo: done at step {result['step']}"
    if "eval_rewards/accuracies" in result:
        line += (f", held-out implicit-reward accuracy {result['eval_rewards/accuracies']:.3f}, margin "
                 f"{result['eval_rewards/margins']:.4f}, chosen-rejected log-prob margin "
                 f"{result['eval_logps/chosen'] - result['eval_logps/rejected']:.3f}")
    return _done(args, line)


def _online(name: str, description: str, aliases: dict):
    """``ppo`` / ``grpo``: the on-policy stages share their command line (``--init`` is also ``--policy``)."""

    def run(args) -> int:
        from .train.rl import run_online

        rc, resume = _load(args)
        stage = getattr(importlib.import_module(f"pocketgpt.train.{name}"), f"{name.upper()}Stage")
        result = run_online(stage, rc[name], args.out, rc, resume=resume)
        parts = [f"{name}: done at step {result['step']}"]
        for key in ("eval_accuracy", "eval_reward"):
            if key in result:
                before = result.get(f"initial_{key}")
                parts.append(f"held-out {key[5:]} (greedy) " + (f"{before:.3f} -> " if before is not None else "")
                             + f"{result[key]:.3f}")
        return _done(args, "; ".join(parts))

    def configure(p) -> None:
        p.description = description
        _training(p, f"pocketgpt.train.{name}", run, out=f"runs/{name}", default_config=f"{name}-tiny",
                  aliases={"init": ["--policy"], **aliases})

    return configure


def _rm(p) -> None:
    p.add_argument("action", nargs="?", choices=["train", "score"], default="train", help="train (default) or score")
    p.add_argument("--init", metavar="CKPT", help="train: the SFT checkpoint to start from")
    p.add_argument("--data", metavar="FILE", help="train: preference pairs JSONL ({prompt, chosen, rejected}); "
                                                  "score: pairs or conversations (or a bundled corpus name)")
    p.add_argument("--val-data", metavar="FILE", help="train: held-out pairs (default: a split of --data)")
    p.add_argument("--ckpt", metavar="RM", help="score: the reward-model checkpoint")
    p.add_argument("--json", action="store_true", help="score: print JSON lines instead of a table")
    _training(p, "pocketgpt.train.reward", _rm_run, out="runs/rm", default_config="rm-tiny")


def _rm_run(args) -> int:
    from .train.reward import score_file, train_reward_model

    if args.action == "score":
        if not args.ckpt or not args.data:
            raise UserError("rm score: needs --ckpt RM and --data FILE")
        device = next((v for k, v, _ in args.config_overrides if k in ("device", "train.device")), "auto")
        res = score_file(args.ckpt, args.data, device=device)
        pairs = res["kind"] == "pairs"
        for r in res["rows"]:
            if args.json:
                print(json.dumps(r))
            elif pairs:
                print(f"{r['where']}\tchosen {r['chosen']:+.4f}\trejected {r['rejected']:+.4f}\t"
                      f"{'ok' if r['correct'] else 'WRONG'}")
            else:
                print(f"{r['where']}\t{r['score']:+.4f}")
        if pairs:
            print(json.dumps({"accuracy": res["accuracy"], "pairs": len(res["rows"])}) if args.json else
                  f"pairwise accuracy {res['accuracy']:.4f} ({len(res['rows'])} pairs)")
        return 0
    if not args.init or not args.data:
        raise UserError("rm: needs --init SFT_CKPT and --data PAIRS (or 'pocketgpt rm score --ckpt RM --data FILE')")
    rc, resume = _load(args)
    result = train_reward_model(args.init, args.data, args.out, rc, val_data=args.val_data, resume=resume)
    if _rank0():
        acc = result.get("eval_accuracy")
        print(f"reward model saved in {Path(args.out) / 'ckpt'}"
              + (f"; held-out pairwise accuracy {acc:.3f}" if acc is not None else ""))
    return 0


def _serve(p) -> None:
    from .serve import API_KEY_ENV

    p.add_argument("--ckpt", required=True, help="checkpoint directory (with tokenizer/), or a run directory with one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; 0.0.0.0: network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    p.add_argument("--max-concurrency", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)  # gone: explained in _serve_run
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting to join the batch before the server answers 429 (default 256)")
    p.add_argument("--model-name", help="model id the API reports (default: the run's name: runs/a/b is a-b)")
    p.add_argument("--threads", type=int, help="CPU threads of the decode loop (default: every core)")
    _device(p)
    p.set_defaults(func=_serve_run)


def _serve_run(args) -> int:
    from . import serve

    try:
        import uvicorn  # noqa: F401

        from .serve.app import create_app
    except ImportError as e:  # the `serve` extra (fastapi, uvicorn) is optional
        raise UserError(f"{e.name} is not installed: pip install 'pocketgpt[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: {args.port} is not a TCP port (0-65535)")
    if args.max_batch is not None:
        raise UserError("--max-batch: gone, the server batches continuously; --max-concurrency N sets how many "
                        "sequences decode together")
    for flag, least in (("max_concurrency", 1), ("max_queue", 0), ("threads", 1)):
        if (value := getattr(args, flag)) is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')}: must be at least {least}, got {value}")
    import torch

    if args.threads:  # every core by default: on a quiet 2-core box 2 threads beat 1 at 1, 16 and 64 clients
        torch.set_num_threads(args.threads)
    # the event loop and the decode thread share the GIL: switch often, or a decoding step waits 5 ms at each event
    sys.setswitchinterval(0.0005)
    api_key = args.api_key if args.api_key is not None else os.environ.get(serve.API_KEY_ENV) or None
    backend = serve.load_backend(args.ckpt, args.device, args.dtype, args.model_name)
    app = create_app(backend, api_key=api_key, max_concurrency=args.max_concurrency, max_queue=args.max_queue)
    print(f"pocketgpt serve: model '{backend.model_id}' ({backend.model.num_params() / 1e6:.1f}M params, context "
          f"{backend.context}) on http://{'localhost' if args.host in ('127.0.0.1', '::1') else args.host}:{args.port}/"
          f"  (API: /v1, {'API key required' if api_key else 'no API key'})", flush=True)
    serve.serve_forever(app, args.host, args.port)
    return 0


def _export(p) -> None:
    p.add_argument("ckpt", help="checkpoint directory (or a run directory, or hf:NAME)")
    p.add_argument("out", help="output directory (hf) or OUT.gguf file (gguf), written atomically")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf = Hugging Face transformers; gguf = llama.cpp / Ollama")
    p.add_argument("--arch", default="auto", choices=["auto", "gpt2", "llama"],
                   help="auto: learned positions → GPT-2, rope → Llama")
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "q8_0"], help="GGUF weights (default f32)")
    p.set_defaults(func=_export_run)


def _export_run(args) -> int:
    from .checkpoint import export_hf, find_checkpoint, load_model
    from .tokenizer import load_tokenizer_for

    if args.format == "gguf":
        from .gguf_export import export_gguf

        arch = export_gguf(args.ckpt, args.out, args.dtype or "f32", args.arch)
        print(f"wrote {arch} GGUF ({args.dtype or 'f32'}) to {args.out}")
        return 0
    if args.dtype:
        raise UserError("--dtype: only for --format gguf (the Hugging Face export is f32)")
    ckpt = find_checkpoint(args.ckpt)
    try:
        tok = load_tokenizer_for(ckpt)
    except UserError:  # weights only: the export has no tokenizer either
        tok = None
    arch = export_hf(load_model(ckpt), args.out, args.arch, tokenizer=tok)
    print(f"wrote {arch} to {args.out}")
    return 0


def _merge(p) -> None:
    p.add_argument("ckpt", help="checkpoint trained with LoRA adapters (--lora_r)")
    p.add_argument("out", help="output directory: the same checkpoint with the adapters folded into the weights")
    p.set_defaults(func=_merge_run)


def _merge_run(args) -> int:
    from .lora import merge

    merge(args.ckpt, args.out)
    print(f"wrote {args.out}")
    return 0


# name, configure(parser) (or a module with configure_cli(name, parser)), one-line help; in pipeline order
COMMANDS = [
    ("tokenizer", _tokenizer, "train a tokenizer (bpe, char, word, unigram) or inspect one"),
    ("prepare", _prepare, "tokenize text/JSONL into train/val token shards"),
    ("pretrain", _pretrain, "pretrain a GPT on prepared shards (TOML presets, resume, DDP)"),
    ("eval", _eval, "evaluate a checkpoint: loss on a data split or text file (bits/byte), lm-eval tasks"),
    ("sample", _sample, "generate text from a checkpoint (streams to the terminal)"),
    ("sft", partial(_training, module="pocketgpt.train.sft", run=_sft_run, out="runs/sft"),
     "supervised chat fine-tuning on conversation JSONL"),
    ("chat", _chat, "talk to a chat model in the terminal"),
    ("pairs", "pocketgpt.tasks", "preference pairs from a model's checked replies to a checkable task"),
    ("rm", _rm, "train a reward model on preference pairs (or score conversations)"),
    ("ppo", _online("ppo", "RLHF with PPO: --init (or --policy) CKPT, a reward (--reward RM_CKPT, --reward_fn "
                    "module:function, or a --task's checker) and prompts (--prompts FILE or --task NAME).", {}),
     "RLHF with PPO against a reward model or a Python reward function"),
    ("dpo", partial(_training, module="pocketgpt.train.dpo", run=_dpo_run, out="runs/dpo"),
     "direct preference optimisation on preference pairs"),
    ("grpo", _online("grpo", "GRPO / RLOO: --init CKPT and a task (--task arithmetic) or --reward_fn module:function "
                     "with --prompts FILE (or --reward RM_CKPT). RLOO: --advantage rloo.",
                     {"samples_per_prompt": ["--n", "--group-size"]}),
     "group relative policy optimisation on a verifiable task"),
    ("serve", _serve, "OpenAI-compatible HTTP API and web chat page"),
    ("export", _export, "export a checkpoint as a Hugging Face GPT-2 / Llama directory or a GGUF file"),
    ("merge", _merge, "fold a checkpoint's LoRA adapters into its weights (a plain checkpoint)"),
    ("speedrun", "pocketgpt.speedrun", "the whole pipeline on bundled data, with a report card"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only=NAME``) one whose NAME subcommand alone is configured — so running one command
    imports only its own module (``pocketgpt prepare`` never imports torch); ``only=""`` configures none (help)."""
    from . import __version__

    # no abbreviations anywhere: `--max_step` must not silently mean `--max_steps` (tokenizer.py does the same)
    parser = argparse.ArgumentParser(prog="pocketgpt", allow_abbrev=False, description="pocketgpt: from raw text to a "
                                     "GPT chat model. Run 'pocketgpt COMMAND --help' for details.")
    parser.add_argument("--version", action="version", version=f"pocketgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, configure, text in COMMANDS:
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", allow_abbrev=False)
        if only is None or only == name:
            if isinstance(configure, str):
                importlib.import_module(configure).configure_cli(name, p)
            else:
                configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a ``UserError`` anywhere is one line on stderr and exit code 2."""
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    # library warnings (a small vocabulary, a prompt cut to the context) as one line each, without source lines
    warnings.showwarning = lambda message, *_, **__: print(f"pocketgpt: warning: {message}", file=sys.stderr)
    chosen = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=chosen if chosen in {name for name, _, _ in COMMANDS} else "")
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"pocketgpt {args.command}: error: {_unknown_argument(parser, argv, extra)}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"pocketgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pocketgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head` that closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _unknown_argument(parser: argparse.ArgumentParser, argv: list[str], extra: list[str]) -> str:
    """One line for the first argument no parser took, with a did-you-mean among the (sub)command's options."""
    from .config import did_you_mean

    for a in argv:  # descend to the innermost subcommand named on the line (e.g. `tokenizer train`)
        subs = next((x.choices for x in parser._actions if isinstance(x, argparse._SubParsersAction)), {})
        parser = subs.get(a, parser)
    flag = next((a.split("=", 1)[0] for a in extra if a.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {extra[0]!r}"
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    return f"{flag}: unknown option{did_you_mean(flag, options)}"
