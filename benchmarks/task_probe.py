"""How well a chat checkpoint does a built-in task: greedy accuracy (Wilson 95%), sampled accuracy and pass@k on the
task's held-out prompts (what RL can turn into greedy accuracy), checked by the task.

    python benchmarks/task_probe.py --ckpt RUN/sft/ckpt --task largest --task_options k=3 --n 400 --samples 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--task", default="largest")
    ap.add_argument("--task_options", default="")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=8)
    a = ap.parse_args()

    import torch

    from pocketgpt.checkpoint import load_model
    from pocketgpt.report import proportion
    from pocketgpt.tasks import get_task, sample_replies
    from pocketgpt.tokenizer import load_tokenizer_for

    task = get_task(a.task, a.task_options)
    model, tok = load_model(a.ckpt), load_tokenizer_for(a.ckpt)
    prompts = task.eval_prompts(a.n)
    with torch.inference_mode():
        greedy = [r[0] for r in sample_replies(model, tok, prompts, temperature=0, max_new_tokens=a.max_new_tokens)]
        sampled = sample_replies(model, tok, prompts, samples=a.samples, max_new_tokens=a.max_new_tokens)
    g = proportion([task.reward(p, r) > 0 for p, r in zip(prompts, greedy)])
    hits = [[task.reward(p, r) > 0 for r in rs] for p, rs in zip(prompts, sampled)]
    acc = sum(map(sum, hits)) / (len(hits) * a.samples)
    pass_k = sum(map(any, hits)) / len(hits)
    print(f"{a.ckpt}: greedy {g['value']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] (n={g['n']}), "
          f"sampled {acc:.3f}, pass@{a.samples} {pass_k:.3f}; e.g. {prompts[0][-1]['content']!r} -> {greedy[0]!r}")


if __name__ == "__main__":
    main()
