"""Built-in verifiable tasks for RL: seeded prompts, a fixed held-out set disjoint from every training prompt, an
exact-answer reward and SFT rows: ``largest`` ("Which is the largest: 47, 82, 15?" → "82") and ``arithmetic`` ("What
is 37 + 58?" → "95"); on a command line ``--task NAME --task_options k=3,digits=2``."""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .io import atomic_write_text, write_json

_FIRST_INT = re.compile(r"-?\d+")
EVAL_SEED = 1_000_003  # the held-out set is always drawn from this seed


def first_integer(text: str) -> int | None:
    """The first integer written in ``text`` (a leading '-' counts), or None."""
    m = _FIRST_INT.search(text)
    return int(m.group()) if m else None


class Task:
    """What every task shares: the held-out pool, training prompts that avoid it, the exact-answer reward, SFT rows.
    A task is a frozen dataclass of its options (``n_eval`` among them) that implements ``num_problems``,
    ``_draw(rng) -> problem tuple``, ``question(problem)``, ``answer(problem)`` and ``parse(question) -> problem``."""

    name = ""
    n_eval: int

    def _need_int(self, key: str, lo: int, hi: int, hi_text: str = "") -> None:
        value = getattr(self, key)
        if not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"task {self.name}: {key} must be an integer in {lo}..{hi_text or hi}, got {value!r}")

    def _check_n_eval(self) -> None:
        if self.n_eval == 0:  # the default: 64 held-out prompts, fewer when the task has fewer problems
            object.__setattr__(self, "n_eval", min(64, self.held_out_pool))
        if not isinstance(self.n_eval, int) or not 1 <= self.n_eval <= self.held_out_pool:
            raise UserError(f"task {self.name}: n_eval must be in 1..{self.held_out_pool} for these options, "
                            f"got {self.n_eval!r}")

    @property
    def held_out_pool(self) -> int:
        """Problems reserved for evaluation whatever ``n_eval`` is (``eval_prompts`` are its first ``n_eval``), so no
        stage trains on a problem that another stage evaluates (a PPO monitoring 64, the report's 400)."""
        return min(self.num_problems // 2, 1000)

    def _draw_n(self, seed: int, n: int, unique: bool, skip: set = frozenset()) -> list[tuple]:
        rng, out, seen = random.Random(seed), [], set()
        while len(out) < n:
            p = self._draw(rng)
            if p not in skip and not (unique and p in seen):
                seen.add(p)
                out.append(p)
        return out

    def _eval_problems(self, n: int | None = None) -> list[tuple]:
        """The first ``n`` distinct problems of the held-out pool (default: the whole pool)."""
        return self._draw_n(EVAL_SEED, min(n or self.held_out_pool, self.held_out_pool), unique=True)

    def _train_problems(self, n: int, seed: int, unique: bool = False) -> list[tuple]:
        """Repeats allowed unless ``unique`` (small problem spaces), held-out problems never."""
        held_out = set(self._eval_problems())
        if unique and n > self.num_problems - len(held_out):
            raise UserError(f"task {self.name}: only {self.num_problems - len(held_out)} distinct training problems "
                            f"exist for these options, {n} asked for")
        return self._draw_n(seed, n, unique, held_out)

    def _prompt(self, problem: tuple) -> list[dict]:
        return [{"role": "user", "content": self.question(problem)}]

    def train_prompts(self, n: int, seed: int = 0, unique: bool = False) -> list[list[dict]]:
        """``n`` training prompts drawn from ``seed`` (``unique``: no repeats); none of them is in the held-out set."""
        return [self._prompt(p) for p in self._train_problems(n, seed, unique)]

    def eval_prompts(self, n: int | None = None) -> list[list[dict]]:
        """The fixed held-out prompts: the first ``n`` of the pool (``n_eval`` by default)."""
        return [self._prompt(p) for p in self._eval_problems(n or self.n_eval)]

    def target(self, prompt: list[dict]) -> int:
        """The correct answer to a prompt made by this task (read back from its last user message)."""
        problem = self.parse(prompt[-1]["content"]) if prompt else None
        if problem is None:
            raise ValueError(f"not a {self.name} question: {prompt[-1]['content'] if prompt else prompt!r}")
        return self.answer(problem)

    def reward(self, prompt: list[dict], reply: str) -> float:
        """Exact-answer reward: 1.0 if the first integer in the reply equals the answer, else 0.0."""
        return 1.0 if first_integer(reply) == self.target(prompt) else 0.0

    def demo_answer(self, problem: tuple, rng: random.Random) -> int:
        """The demonstrator's answer in SFT rows: the right one (a task with an imperfect demonstrator overrides)."""
        return self.answer(problem)

    def sft_conversations(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` worked examples in the task's chat format, for a brief SFT before RL (held-out problems excluded)."""
        rng = random.Random(seed + 1)
        return [{"messages": self._prompt(p) + [{"role": "assistant", "content": str(self.demo_answer(p, rng))}]}
                for p in self._train_problems(n, seed)]

    def write_sft_jsonl(self, path: str | Path, n: int, seed: int = 0) -> Path:
        lines = [json.dumps(c, ensure_ascii=False) for c in self.sft_conversations(n, seed)]
        atomic_write_text(path, "\n".join(lines) + "\n")
        return Path(path)


_LARGEST = re.compile(r"Which is the largest: (\d+(?:, \d+)+)\?")


@dataclass(frozen=True)
class LargestTask(Task):
    """The largest of ``k`` numbers of exactly ``digits`` digits each (one-digit numbers are 0-9). ``demo_accuracy``
    < 1 makes the SFT rows imperfect, as careless human demonstrators are: with probability ``1 - demo_accuracy`` a
    row answers the *first* number listed; the checker, pairs and held-out set stay exact."""

    k: int = 3
    digits: int = 2
    n_eval: int = 0  # 0 = 64 (or the whole held-out pool when smaller)
    demo_accuracy: float = 1.0

    name = "largest"

    def __post_init__(self) -> None:
        self._need_int("k", 2, 10)
        self._need_int("digits", 1, 6)
        if not isinstance(self.demo_accuracy, (int, float)) or not 0 <= self.demo_accuracy <= 1:
            raise UserError(f"task largest: demo_accuracy must be a number in 0..1, got {self.demo_accuracy!r}")
        self._check_n_eval()

    @property
    def num_problems(self) -> int:
        return (10 if self.digits == 1 else 9 * 10 ** (self.digits - 1)) ** self.k

    def demo_answer(self, problem: tuple, rng: random.Random) -> int:
        return self.answer(problem) if rng.random() < self.demo_accuracy else int(problem[0])

    def _draw(self, rng: random.Random) -> tuple:
        lo = 10 ** (self.digits - 1) if self.digits > 1 else 0
        return tuple(rng.randint(lo, 10**self.digits - 1) for _ in range(self.k))

    def question(self, problem: tuple) -> str:
        return f"Which is the largest: {', '.join(map(str, problem))}?"

    def answer(self, problem: tuple) -> int:
        return max(int(x) for x in problem)

    def parse(self, question: str) -> tuple | None:
        m = _LARGEST.search(question)
        return tuple(int(x) for x in m.group(1).split(", ")) if m else None


_QUESTION = re.compile(r"What is (-?\d+(?: [+\-] -?\d+)+)\?")


@dataclass(frozen=True)
class ArithmeticTask(Task):
    """Addition / subtraction of ``operands`` non-negative integers with 1..``digits`` digits each, operators drawn
    from ``ops``; with ``nonnegative`` a two-operand subtraction puts the larger operand first (answers >= 0)."""

    digits: int = 2
    ops: str = "+-"
    nonnegative: bool = True
    n_eval: int = 0  # 0 = 64 (or the whole held-out pool when smaller)
    operands: int = 2
    second_digits: int = 0  # the operands after the first have 1..second_digits digits (0 = digits)

    name = "arithmetic"

    def __post_init__(self) -> None:
        self._need_int("digits", 1, 9)
        if not isinstance(self.ops, str) or not self.ops or any(op not in "+-" for op in self.ops):
            raise UserError(f"task arithmetic: ops must be made of '+' and '-', got {self.ops!r}")
        self._need_int("operands", 2, 6)
        self._need_int("second_digits", 0, self.digits, f"digits ({self.digits})")
        if self.operands > 2 and self.ops != "+":
            raise UserError(f"task arithmetic: with {self.operands} operands ops must be '+', got {self.ops!r}")
        self._check_n_eval()

    @property
    def num_problems(self) -> int:
        return 10**self.digits * (10 ** (self.second_digits or self.digits) * len(set(self.ops))) ** (self.operands - 1)

    def _draw(self, rng: random.Random) -> tuple:
        """A problem as a flat tuple ``(a, op, b[, op, c ...])``."""
        hi, hi2 = 10**self.digits - 1, 10 ** (self.second_digits or self.digits) - 1
        if self.operands > 2:  # ops is "+"
            out: list = [rng.randint(0, hi)]
            for _ in range(self.operands - 1):
                out += ["+", rng.randint(0, hi2)]
            return tuple(out)
        a, b = rng.randint(0, hi), rng.randint(0, hi2)
        op = rng.choice(self.ops)
        if op == "-" and self.nonnegative and b > a and not self.second_digits:
            a, b = b, a
        return a, op, b

    def question(self, problem: tuple) -> str:
        return f"What is {' '.join(map(str, problem))}?"

    def answer(self, problem: tuple) -> int:
        return int(problem[0]) + sum(int(x) if op == "+" else -int(x) for op, x in zip(problem[1::2], problem[2::2]))

    def parse(self, question: str) -> tuple | None:
        m = _QUESTION.search(question)
        return tuple(m.group(1).split(" ")) if m else None


TASKS = {"arithmetic": ArithmeticTask, "largest": LargestTask}


def parse_task_options(text: str) -> dict:
    """``"k=3,ops=+-,demo_accuracy=0.4"`` → ``{"k": 3, "ops": "+-", "demo_accuracy": 0.4}``."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--task_options: expected name=value items separated by commas, got {item!r}")
        value = value.strip()
        out[key.strip()] = (int(value) if re.fullmatch(r"-?\d+", value)
                            else float(value) if re.fullmatch(r"-?\d*\.\d+", value) else value)
    return out


def get_task(name: str, options: str | dict | None = None, **more) -> Task:
    """A built-in task by name from options (a dict or ``"k=3,digits=2"``, plus keywords); unknown ones: UserError."""
    if name not in TASKS:
        raise UserError(f"--task: unknown task {name!r} (built-in: {', '.join(sorted(TASKS))})")
    opts = {**(parse_task_options(options) if isinstance(options, str) else options or {}), **more}
    known = TASKS[name].__dataclass_fields__
    unknown = [key for key in opts if key not in known]
    if unknown:
        raise UserError(f"task {name}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return TASKS[name](**opts)


# ---- `pocketgpt pairs`: a chat model's replies to a task's prompts, checked, as preference pairs (the RLHF way);
# --split train / eval draw from disjoint prompt sets, so a reward model or DPO trained on the first is measured on
# prompts it never saw.

def sample_replies(model, tokenizer, prompts: list[list[dict]], *, samples: int = 1, max_new_tokens: int = 8,
                   temperature: float = 1.0, top_k: int | None = None, seed: int | None = 0) -> list[list[str]]:
    """``samples`` replies (text, without ``<|end|>``) per prompt through the engine; ``temperature=0`` is greedy.
    Prompts go 64 at a time, batch ``b`` seeded by ``seed + b``, so a reply does not depend on the prompts after it."""
    from .chat import render, stop_id
    from .engine import generate

    out: list[list[str]] = []
    for b, i in enumerate(range(0, len(prompts), 64)):
        chunk = prompts[i: i + 64]
        ids = [render(p, tokenizer, add_generation_prompt=True)[0] for p in chunk]
        rows = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None,
                        n=samples, stop_ids=[stop_id(tokenizer)], seed=None if seed is None else seed + b)
        out += [[tokenizer.decode(rows[j * samples + k]) for k in range(samples)] for j in range(len(chunk))]
    return out


def make_pairs(task, prompts: list[list[dict]], replies: list[list[str]], max_pairs_per_prompt: int = 2
               ) -> tuple[list[dict], dict]:
    """Checked replies → ``{"prompt", "chosen", "rejected"}`` pairs (chosen right, rejected wrong) and counts."""
    pairs: list[dict] = []
    n_right = n_all = mixed = 0
    for prompt, reps in zip(prompts, replies):
        right = [r for r in reps if task.reward(prompt, r) > 0]
        # distinct wrong replies, first-seen order; a blank one makes no pair (rm and dpo want text on both sides)
        wrong = list(dict.fromkeys(r for r in reps if task.reward(prompt, r) <= 0 and r.strip()))
        n_right += len(right)
        n_all += len(reps)
        if right and wrong:
            mixed += 1
            pairs += [{"prompt": prompt, "chosen": right[k % len(right)], "rejected": rej}
                      for k, rej in enumerate(wrong[:max_pairs_per_prompt])]
    return pairs, {"prompts": len(prompts), "replies": n_all, "sample_accuracy": n_right / max(1, n_all),
                   "prompts_with_pairs": mixed, "pairs": len(pairs)}


def collect_pairs(ckpt, task, *, split: str = "train", prompts: int | None = None, samples: int = 4,
                  max_pairs_per_prompt: int = 2, max_new_tokens: int = 8, temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0, device: str = "auto") -> tuple[list[dict], dict]:
    """Load ``ckpt``, sample replies to the task's ``split`` prompts ("train": ``prompts`` distinct training
    prompts drawn from ``seed``; "eval": the held-out set, or its first ``prompts``), check them, form pairs."""
    from .checkpoint import find_checkpoint, load_checkpoint

    if samples < 2:
        raise UserError(f"--samples: a pair needs at least 2 replies per prompt, got {samples}")
    if split == "train":
        if not prompts or prompts < 1:
            raise UserError("--prompts: how many training prompts to sample (e.g. --prompts 2000)")
        ps = task.train_prompts(prompts, seed=seed, unique=True)
    elif split == "eval":
        ps = task.eval_prompts(prompts)
    else:
        raise UserError(f"--split: 'train' or 'eval', got {split!r}")
    ckpt = find_checkpoint(ckpt)
    model, tok = load_checkpoint(ckpt, device)
    reps = sample_replies(model, tok, ps, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed)
    pairs, stats = make_pairs(task, ps, reps, max_pairs_per_prompt)
    stats.update(split=split, samples=samples, temperature=temperature, ckpt=str(ckpt))
    return pairs, stats


def configure_cli(name, p) -> None:
    p.add_argument("--ckpt", required=True, help="the chat model that writes the replies (e.g. runs/sft/ckpt)")
    p.add_argument("--task", default="arithmetic",
                   help=f"built-in checkable task ({', '.join(sorted(TASKS))}; default arithmetic)")
    p.add_argument("--task_options", "--task-options", dest="task_options", default="",
                   help="the task's options, name=value separated by commas (e.g. k=3,digits=2)")
    p.add_argument("--split", choices=("train", "eval"), default="train",
                   help="train: prompts drawn from the training problems; eval: the held-out set (default train)")
    p.add_argument("--prompts", type=int, default=None,
                   help="how many prompts (eval: the first N held-out ones, default the task's n_eval)")
    p.add_argument("--samples", type=int, default=4, help="sampled replies per prompt (default 4)")
    p.add_argument("--max-pairs-per-prompt", "--max_pairs_per_prompt", dest="max_pairs_per_prompt", type=int,
                   default=2, help="pairs kept per prompt (default 2)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1: the policy)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    p.add_argument("--stats", default=None, help="also write the counts as JSON here")
    p.set_defaults(func=_pairs_cli)


def _pairs_cli(args) -> int:
    task = get_task(args.task, args.task_options)
    pairs, stats = collect_pairs(args.ckpt, task, split=args.split, prompts=args.prompts, samples=args.samples,
                                 max_pairs_per_prompt=args.max_pairs_per_prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device)
    if not pairs:
        raise UserError(f"no pairs: on {stats['prompts']} prompts the {stats['replies']} replies were all right or "
                        f"all wrong per prompt (sample accuracy {stats['sample_accuracy']:.3f}); try more --samples "
                        f"or a higher --temperature")
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    if args.stats:
        write_json(args.stats, stats)
    print(f"{stats['pairs']} pairs from {stats['prompts_with_pairs']} of {stats['prompts']} {args.split} prompts "
          f"({stats['replies']} replies, {stats['sample_accuracy']:.1%} right) → {args.out}", file=sys.stderr)
    return 0
