"""Evaluation: lm-evaluation-harness tasks through the lm-eval model ``pocketgpt`` (``run_tasks``, and lm-eval's own
command line as ``python -m pocketgpt.evaluate``), and bits per byte of a text file (``text_metrics``)."""

from __future__ import annotations

import functools
import math
import sys
from typing import Optional, Sequence

import torch

from .checkpoint import load_checkpoint
from .engine import SamplingParams, generate, pack_replies, token_logprobs
from .errors import UserError
from .records import fit, read_text_file


def score_batch(model, rows: Sequence[tuple[list[int], list[int]]], batch_size: int = 16):
    """``(sum of log p(reply | prompt), reply is the greedy continuation)`` per ``(prompt, reply)``; rows longer than
    the context keep their newest prompt tokens."""
    rows = [fit(p, model.config.block_size, r) for p, r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))  # similar lengths batch
    out: list = [None] * len(rows)
    device = model.wte.weight.device
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            chunk = order[b0: b0 + batch_size]
            batch = pack_replies([rows[i][0] for i in chunk], [rows[i][1] for i in chunk], device=device)
            logp, _, _, best = token_logprobs(model, *batch, return_argmax=True)
            greedy = ((best == batch[2]) | ~batch[3]).all(-1)
            for j, i in enumerate(chunk):
                out[i] = (float(logp[j].sum()), bool(greedy[j]))
    return out


def rolling_logprob(model, ids: list[int], prefix: int, batch_size: int = 16) -> float:
    """log p(ids) after ``prefix`` in disjoint windows of the context, each conditioned on the token before it and
    its own tokens only (lm-eval's rolling windows with ``context_len=1``)."""
    n = model.config.block_size - 1  # prompt + reply must fit the context
    seq = [prefix] + list(ids)
    rows = [(seq[i:i + 1], seq[i + 1:i + 1 + n]) for i in range(0, len(ids), n)]
    return sum(lp for lp, _ in score_batch(model, rows, batch_size))


def text_metrics(ckpt, path, batch_size: int = 16, device: str = "cpu") -> dict:
    """Loss (nats per token) and bits per UTF-8 byte of a checkpoint on a text file."""
    model, tok = load_checkpoint(ckpt, device)
    text = read_text_file(path)
    ids = tok.encode(text)
    if not ids:
        raise UserError(f"{path}: the file is empty")
    logp = rolling_logprob(model, ids, tok.eos_id, batch_size)
    n_bytes = len(text.encode("utf-8"))
    return {"loss": -logp / len(ids), "bits_per_byte": -logp / math.log(2) / n_bytes, "tokens": len(ids),
            "bytes": n_bytes}


@functools.cache
def _harness_model():
    """The lm-eval model class (built on first use: lm-eval is an optional extra)."""
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'pocketgpt[eval]'") from None

    @register_model("pocketgpt")
    class PocketGPTLM(TemplateLM):
        def __init__(self, ckpt: str, batch_size=16, device: Optional[str] = "cpu", max_gen_toks=256, **_):
            super().__init__()
            self.model, self.tok = load_checkpoint(ckpt, device or "cpu")
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" → 16
            self.max_gen_toks = int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        def tok_encode(self, string: str, add_special_tokens=None, **_) -> list[int]:  # as every document starts
            return ([] if add_special_tokens is False else [self.eot_token_id]) + self.tok.encode(string)

        def tok_decode(self, tokens, **_) -> str:
            return self.tok.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
            return score_batch(self.model, [(c, r) for _, c, r in requests], self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return [rolling_logprob(self.model, self.tok.encode(r.args[0]), self.eot_token_id, self.batch_size)
                    for r in requests]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            groups: dict = {}
            for i, r in enumerate(requests):
                context, kw = r.args[0], dict(r.args[1] or {})
                until = kw.pop("until", None) or []
                params = SamplingParams(
                    max_new_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)),
                    temperature=float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0,
                    top_p=kw.pop("top_p", None), stop=[until] if isinstance(until, str) else until,
                    stop_ids=sorted(self.tok.special_ids.values()))
                groups.setdefault(repr(params), (params, []))[1].append((i, self.tok_encode(context)))
            out = [""] * len(requests)
            for params, items in groups.values():
                for b0 in range(0, len(items), self.batch_size):
                    chunk = items[b0: b0 + self.batch_size]
                    res = generate(self.model, [ids for _, ids in chunk], params, tokenizer=self.tok,
                                   return_logprobs=True)
                    for (i, _), r in zip(chunk, res):
                        out[i] = r.text
            return out

    return PocketGPTLM


def __getattr__(name):  # ``pocketgpt.evaluate:PocketGPTLM``, the entry point, without importing lm-eval before
    if name == "PocketGPTLM":
        return _harness_model()
    raise AttributeError(name)


def run_tasks(ckpt, tasks: Sequence[str] | str, include_path=None, limit: Optional[float] = None,
              num_fewshot: Optional[int] = None, batch_size: int = 16, device: str = "cpu") -> dict:
    """lm-eval ``tasks`` on a checkpoint, in this process: ``{task: {metric: value, ..., "n": items}}``."""
    lm = _harness_model()(str(ckpt), batch_size=batch_size, device=device)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        hint = f"under {include_path}" if include_path else "(pass --include_path DIR for local task YAMLs)"
        raise UserError(f"--tasks: unknown task {unknown[0]!r} {hint}")
    res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=1000)
    return {task: {**{k.split(",")[0]: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))},
                   "n": res.get("n-samples", {}).get(task, {}).get("effective")}
            for task, metrics in res["results"].items()}


if __name__ == "__main__":  # lm-eval's own command line, with the pocketgpt model registered
    _harness_model()
    if not any(a.startswith("--device") for a in sys.argv):
        sys.argv += ["--device", "auto"]  # lm-eval's default is cuda, even on a machine without one
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
