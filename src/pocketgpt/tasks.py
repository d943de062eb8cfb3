"""Built-in verifiable tasks for RL (GRPO / PPO with a checkable reward).

A task makes prompts (chat messages) from a seed, keeps a fixed held-out evaluation set that never appears among the
training prompts, scores a reply with an exact-answer reward, and can write SFT conversations in the same format so a
model can first be taught the format briefly::

    task = get_task("arithmetic", digits=2, ops="+-")
    train = task.train_prompts(256, seed=0)        # list of chat prompts (each a list of messages)
    held_out = task.eval_prompts(64)               # fixed, disjoint from every training prompt
    task.reward(held_out[0], "95")                 # 1.0 if the first integer in the reply is the answer, else 0.0
    task.write_sft_jsonl("arith_sft.jsonl", 2000)  # {"messages": [user question, assistant answer]} per line

The one task today is ``arithmetic``: multi-digit addition / subtraction ("What is 37 + 58?" → "95").
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

_QUESTION = re.compile(r"What is (-?\d+) ([+\-]) (-?\d+)\?")
_FIRST_INT = re.compile(r"-?\d+")
EVAL_SEED = 1_000_003  # the held-out set is always drawn from this seed


def first_integer(text: str) -> int | None:
    """The first integer written in ``text`` (a leading '-' counts), or None."""
    m = _FIRST_INT.search(text)
    return int(m.group()) if m else None


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition / subtraction of non-negative integers with 1..``digits`` digits each.

    ``ops`` is a string of operators to draw from ("+", "-" or "+-"). With ``nonnegative`` (default) a subtraction
    puts the larger operand first, so every answer is >= 0.
    """

    digits: int = 2
    ops: str = "+-"
    nonnegative: bool = True
    n_eval: int = 64

    name = "arithmetic"

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 9:
            raise UserError(f"task arithmetic: digits must be an integer in 1..9, got {self.digits!r}")
        if not self.ops or any(op not in "+-" for op in self.ops):
            raise UserError(f"task arithmetic: ops must be made of '+' and '-', got {self.ops!r}")
        if self.n_eval < 1 or self.n_eval * 2 > self.num_problems:
            raise UserError(
                f"task arithmetic: n_eval must be in 1..{self.num_problems // 2} for {self.digits} digit(s), "
                f"got {self.n_eval}"
            )

    # ---- problems ------------------------------------------------------------------------------------------------

    @property
    def num_problems(self) -> int:
        n = 10**self.digits
        return n * n * len(set(self.ops))

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = rng.choice(self.ops)
        if op == "-" and self.nonnegative and b > a:
            a, b = b, a
        return a, op, b

    @staticmethod
    def question(a: int, op: str, b: int) -> str:
        return f"What is {a} {op} {b}?"

    @staticmethod
    def answer(a: int, op: str, b: int) -> int:
        return a + b if op == "+" else a - b

    def _eval_problems(self) -> list[tuple[int, str, int]]:
        rng, seen, out = random.Random(EVAL_SEED), set(), []
        while len(out) < self.n_eval:
            p = self._draw(rng)
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    def _train_problems(self, n: int, seed: int) -> list[tuple[int, str, int]]:
        held_out = set(self._eval_problems())
        rng, out = random.Random(seed), []
        while len(out) < n:  # repeats allowed (small problem spaces), held-out problems never
            p = self._draw(rng)
            if p not in held_out:
                out.append(p)
        return out

    # ---- the task interface --------------------------------------------------------------------------------------

    def train_prompts(self, n: int, seed: int = 0) -> list[list[dict]]:
        """``n`` training prompts drawn from ``seed``; none of them is in the held-out set."""
        return [[{"role": "user", "content": self.question(*p)}] for p in self._train_problems(n, seed)]

    def eval_prompts(self, n: int | None = None) -> list[list[dict]]:
        """The fixed held-out prompts (the first ``n`` of them; all ``n_eval`` by default)."""
        probs = self._eval_problems()[: n or self.n_eval]
        return [[{"role": "user", "content": self.question(*p)}] for p in probs]

    def target(self, prompt: list[dict]) -> int:
        """The correct answer to a prompt made by this task (read back from its last user message)."""
        m = _QUESTION.search(prompt[-1]["content"]) if prompt else None
        if not m:
            raise ValueError(f"not an arithmetic question: {prompt[-1]['content'] if prompt else prompt!r}")
        return self.answer(int(m.group(1)), m.group(2), int(m.group(3)))

    def reward(self, prompt: list[dict], reply: str) -> float:
        """Exact-answer reward: 1.0 if the first integer in the reply equals the answer, else 0.0."""
        return 1.0 if first_integer(reply) == self.target(prompt) else 0.0

    def sft_conversations(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` worked examples in the task's chat format, for a brief SFT before RL (held-out problems excluded)."""
        return [
            {"messages": [{"role": "user", "content": self.question(*p)},
                          {"role": "assistant", "content": str(self.answer(*p))}]}
            for p in self._train_problems(n, seed)
        ]

    def write_sft_jsonl(self, path: str | Path, n: int, seed: int = 0) -> Path:
        from .io import atomic_write_text

        lines = [json.dumps(c, ensure_ascii=False) for c in self.sft_conversations(n, seed)]
        atomic_write_text(path, "\n".join(lines) + "\n")
        return Path(path)


TASKS = {"arithmetic": ArithmeticTask}


def get_task(name: str, **options) -> ArithmeticTask:
    """Build a built-in task by name; unknown names / options are a ``UserError`` naming them."""
    if name not in TASKS:
        raise UserError(f"--task: unknown task {name!r} (built-in: {', '.join(sorted(TASKS))})")
    cls = TASKS[name]
    known = set(cls.__dataclass_fields__)
    for key in options:
        if key not in known:
            raise UserError(f"task {name}: unknown option {key!r} (known: {', '.join(sorted(known))})")
    return cls(**options)
