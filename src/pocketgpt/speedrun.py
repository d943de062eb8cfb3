"""``pocketgpt speedrun``: the whole pipeline on bundled data in one command, with a report card.

    tokenizer (byte-level BPE on English + Chinese) → prepare → pretrain → SFT (dialogues + arithmetic format)
    → reward model (HH-RLHF pairs) → PPO and DPO (from the SFT model) → GRPO (arithmetic, from the SFT model)
    → evaluation → RUN/report.md (+ plots, sample chats)

Every stage is the same ``pocketgpt`` command a user would type, run as a child process with the options of the
preset (``configs/speedrun-PRESET.toml``: one table per stage, each key an option of that stage's command). A child
process per stage gives each stage its own progress bar, its own peak memory figure (``wait4``'s max RSS) and the
stages' own resume logic: an interrupted speedrun, run again with the same ``--out``, skips the finished stages
(``RUN/speedrun_state.json``) and the interrupted stage resumes from its last checkpoint.

The chat model at the end is the DPO model (``RUN/dpo/ckpt``): DPO is the most stable of the three preference/RL
methods at this size; PPO's and GRPO's models are kept beside it and compared in the report.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import UserError
from .io import atomic_write_text, read_json, write_json

PRESETS = ("cpu-tiny", "cpu-small", "gpu-124m")
STAGES = ("tokenizer", "prepare", "pretrain", "sft", "rm", "ppo", "dpo", "grpo", "eval", "report")

# Sample prompts for the report's chats (English and Chinese)
CHAT_PROMPTS = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "user", "content": "What do you like to do on weekends?"}],
    [{"role": "user", "content": "你好，你叫什么名字？"}],
    [{"role": "user", "content": "你喜欢看什么电影？"}],
    [{"role": "user", "content": "What is 23 + 45?"}],
]


# ---------------------------------------------------------------------------------------------------------------------
# presets


def load_preset(name: str) -> dict[str, dict[str, Any]]:
    """Read ``speedrun-NAME.toml`` (a preset name) or a TOML path; one table per stage."""
    from .config import read_toml, resolve_config_path

    if name in PRESETS:
        name = f"speedrun-{name}"
    path = resolve_config_path(name)
    data = read_toml(path)
    unknown = sorted(set(data) - set(STAGES) - {"speedrun"})
    if unknown:
        raise UserError(f"{path}: unknown section [{unknown[0]}] (sections: {', '.join(('speedrun',) + STAGES)})")
    data.setdefault("speedrun", {})
    data["_path"] = {"path": str(path)}
    return data


def _opts(table: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """A TOML table as command-line options: ``{"n_layer": 2, "compile": false}`` → ``--n_layer 2 --compile false``."""
    out: list[str] = []
    for k, v in table.items():
        if k in skip:
            continue
        if isinstance(v, list):
            out += [f"--{k}", *map(str, v)]
        elif isinstance(v, bool):
            out += [f"--{k}", "true" if v else "false"]
        else:
            out += [f"--{k}", str(v)]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# running stages


def run_child(args: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run ``python -m pocketgpt ARGS``; stdout/stderr go to the terminal and to ``log_path``.

    Returns (exit code, wall seconds, peak RSS in MB of that child alone)."""
    cmd = [sys.executable, "-m", "pocketgpt", *args]
    t0 = time.time()
    with open(log_path, "ab") as log:
        log.write(("$ pocketgpt " + " ".join(shlex.quote(a) for a in args) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            log.write(line)
            log.flush()
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            rc = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss / 1024  # KiB on Linux
        except (ChildProcessError, AttributeError):  # no wait4 (not Linux/macOS)
            rc = proc.wait()
            peak = float("nan")
        proc.returncode = rc
    return rc, time.time() - t0, peak


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline


class Speedrun:
    def __init__(self, preset: str, out: str | Path, *, device: str = "auto"):
        self.preset_name = preset
        self.preset = load_preset(preset)
        self.out = Path(out)
        self.device = device
        self.state_path = self.out / "speedrun_state.json"
        self.log_path = self.out / "speedrun.log"
        self.state: dict = {"preset": preset, "done": {}}

    # ---- state ------------------------------------------------------------------------------------------------------

    def load_state(self) -> None:
        if self.state_path.exists():
            st = read_json(self.state_path)
            if st.get("preset") != self.preset_name:
                raise UserError(
                    f"{self.state_path}: this run directory belongs to preset {st.get('preset')!r}, not "
                    f"{self.preset_name!r}; use another --out (or the same --preset)"
                )
            self.state = st

    def save_state(self) -> None:
        write_json(self.state_path, self.state)

    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def table(self, stage: str) -> dict:
        return dict(self.preset.get(stage, {}))

    # ---- stage commands --------------------------------------------------------------------------------------------

    def _common(self) -> list[str]:
        return ["--device", self.device] if self.device != "auto" else []

    def cmd_tokenizer(self) -> list[str]:
        t = self.table("tokenizer")
        builtins = t.pop("builtin", ["shakespeare", "shuihu", "chat"])
        args = ["tokenizer", "train", "--kind", str(t.pop("kind", "bpe")), "--vocab-size", str(t.pop("vocab_size", 4096)),
                "--out", str(self.p("tokenizer"))]
        for b in builtins:
            args += ["--builtin", b]
        if t:
            raise UserError(f"{self.preset['_path']['path']}: [tokenizer] unknown key '{next(iter(t))}'")
        return args

    def cmd_prepare(self) -> list[str]:
        t = self.table("prepare")
        builtins = t.pop("builtin", ["shakespeare", "shuihu"])
        args = ["prepare", "--tokenizer", str(self.p("tokenizer")), "--out", str(self.p("data"))]
        for b in builtins:
            args += ["--builtin", b]
        return args + _opts(t)

    def cmd_pretrain(self) -> list[str]:
        t = self.table("pretrain")
        cfg = t.pop("config", "shakespeare-char")
        return ["pretrain", "--config", cfg, "--dir", str(self.p("data")), "--out", str(self.p("pretrain")),
                *_opts(t), *self._common()]

    def write_sft_extra(self) -> Path:
        """The arithmetic task's format as SFT conversations, so GRPO starts from a model that knows the format."""
        task = self.task()
        n = int(self.table("speedrun").get("arithmetic_sft", 400))
        path = self.p("arithmetic_sft.jsonl")
        convs = task.sft_conversations(n, seed=1)
        atomic_write_text(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
        return path

    def task(self):
        """The GRPO stage's arithmetic task, with the options the grpo command will see (its preset + ours)."""
        from .config import read_toml, resolve_config_path
        from .tasks import get_task

        t = self.table("grpo")
        opts = dict(read_toml(resolve_config_path(t.get("config", "grpo-arithmetic"))).get("grpo", {}))
        opts.update(t)
        return get_task("arithmetic", digits=int(opts.get("task_digits", 2)), ops=str(opts.get("task_ops", "+-")),
                        n_eval=int(opts.get("n_eval", 64)))

    def cmd_sft(self) -> list[str]:
        t = self.table("sft")
        cfg = t.pop("config", "sft-small")
        data = t.pop("data", ["chat_en", "chat_zh"])
        return ["sft", "--init", str(self.p("pretrain", "ckpt")), "--data", *data, str(self.write_sft_extra()),
                "--config", cfg, "--out", str(self.p("sft")), *_opts(t), *self._common()]

    def split_prefs(self) -> tuple[Path, Path]:
        """Bundled HH-RLHF pairs → training pairs + held-out prompts (never seen by RM, PPO or DPO)."""
        from .data import builtin_path

        train_p, held_p = self.p("prefs_train.jsonl"), self.p("heldout_prompts.jsonl")
        if train_p.exists() and held_p.exists():
            return train_p, held_p
        import gzip

        src = builtin_path("prefs")
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rt", encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        n_held = int(self.table("speedrun").get("heldout_prompts", 32))
        held = [json.loads(ln) for ln in lines[-n_held:]]
        atomic_write_text(train_p, "\n".join(lines[:-n_held]) + "\n")
        atomic_write_text(held_p, "".join(json.dumps({"prompt": r["prompt"]}, ensure_ascii=False) + "\n" for r in held))
        return train_p, held_p

    def ppo_prompts(self) -> Path:
        train_p, _ = self.split_prefs()
        path = self.p("ppo_prompts.jsonl")
        if not path.exists():
            rows = [json.loads(ln) for ln in train_p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            atomic_write_text(path, "".join(json.dumps({"prompt": r["prompt"]}, ensure_ascii=False) + "\n" for r in rows))
        return path

    def cmd_rm(self) -> list[str]:
        t = self.table("rm")
        cfg = t.pop("config", "rm-tiny")
        train_p, _ = self.split_prefs()
        return ["rm", "--init", str(self.p("sft", "ckpt")), "--data", str(train_p), "--config", cfg,
                "--out", str(self.p("rm")), *_opts(t), *self._common()]

    def cmd_ppo(self) -> list[str]:
        t = self.table("ppo")
        cfg = t.pop("config", "ppo-tiny")
        return ["ppo", "--policy", str(self.p("sft", "ckpt")), "--reward", str(self.p("rm", "ckpt")),
                "--prompts", str(self.ppo_prompts()), "--config", cfg, "--out", str(self.p("ppo")), *_opts(t),
                *self._common()]

    def cmd_dpo(self) -> list[str]:
        t = self.table("dpo")
        cfg = t.pop("config", "dpo-tiny")
        train_p, _ = self.split_prefs()
        return ["dpo", "--init", str(self.p("sft", "ckpt")), "--data", str(train_p), "--config", cfg,
                "--out", str(self.p("dpo")), *_opts(t), *self._common()]

    def cmd_grpo(self) -> list[str]:
        t = self.table("grpo")
        cfg = t.pop("config", "grpo-tiny")
        return ["grpo", "--init", str(self.p("sft", "ckpt")), "--task", "arithmetic", "--config", cfg,
                "--out", str(self.p("grpo")), *_opts(t), *self._common()]

    # ---- driver ------------------------------------------------------------------------------------------------------

    def run(self, stop_after: Optional[str] = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.load_state()
        t_all = time.time()
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("tokenizer", lambda: self._child("tokenizer", self.cmd_tokenizer())),
            ("prepare", lambda: self._child("prepare", self.cmd_prepare())),
            ("pretrain", lambda: self._child("pretrain", self.cmd_pretrain())),
            ("sft", lambda: self._child("sft", self.cmd_sft())),
            ("rm", lambda: self._child("rm", self.cmd_rm())),
            ("ppo", lambda: self._child("ppo", self.cmd_ppo())),
            ("dpo", lambda: self._child("dpo", self.cmd_dpo())),
            ("grpo", lambda: self._child("grpo", self.cmd_grpo())),
            ("eval", self._eval),
            ("report", self._report),
        ]
        for i, (name, fn) in enumerate(steps, 1):
            if name in self.state["done"] and name != "report":
                print(f"[{i}/{len(steps)}] {name}: done earlier, skipped", file=sys.stderr)
                continue
            print(f"\n[{i}/{len(steps)}] {name} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            info = fn() or {}
            info.setdefault("wall_s", round(time.time() - t0, 1))
            self.state["done"][name] = info
            self.save_state()
            if stop_after == name:
                break
        self.state["total_wall_s"] = round(sum(v.get("wall_s", 0) for v in self.state["done"].values()), 1)
        self.state["this_invocation_s"] = round(time.time() - t_all, 1)
        self.save_state()
        return self.p("report.md")

    def _child(self, name: str, args: list[str]) -> dict:
        rc, wall, peak = run_child(args, self.log_path)
        if rc != 0:
            raise UserError(
                f"stage '{name}' failed (exit {rc}); its output is in {self.log_path}. Fix the cause and run the same "
                f"speedrun command again: finished stages are skipped and '{name}' resumes from its last checkpoint"
            )
        return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1), "command": "pocketgpt " + " ".join(args)}

    # ---- evaluation ----------------------------------------------------------------------------------------------------

    def _eval(self) -> dict:
        """Held-out comparisons that need models side by side: PPO/DPO vs SFT judged by the RM; GRPO accuracy;
        sample chats. Runs in this process (peak RSS reported from the whole process)."""
        import resource

        from .checkpoint import load_model
        from .runtime import pick_device
        from .tokenizer import load_tokenizer_for
        from .train.reward import load_reward_model
        from .train.rl_common import read_prompts, rollout

        ev = self.table("eval")
        seed = int(ev.get("seed", 0))
        max_new = int(ev.get("max_new_tokens", 48))
        temperature = float(ev.get("temperature", 0.7))
        device = pick_device(self.device)
        tok = load_tokenizer_for(self.p("sft", "ckpt"))
        rm = load_reward_model(self.p("rm", "ckpt"), device=device)
        _, held_p = self.split_prefs()
        prompts = read_prompts(held_p)
        models = {name: load_model(self.p(name, "ckpt"), device=device) for name in ("sft", "ppo", "dpo")}

        def replies(model):
            rs = rollout(model, tok, prompts, n=1, max_new_tokens=max_new, temperature=temperature, top_k=50,
                         seed=seed, recompute_logprobs=False)
            return [r.prompt_ids + r.reply_ids for r in rs], [r.text for r in rs]

        rows, texts, scores = {}, {}, {}
        for name, m in models.items():
            rows[name], texts[name] = replies(m)
            scores[name] = rm.score_ids(rows[name], tok.pad_id)
        out: dict[str, Any] = {"heldout_prompts": len(prompts)}
        for name in ("sft", "ppo", "dpo"):
            out[f"{name}_rm_reward"] = sum(scores[name]) / len(scores[name])
        for name in ("ppo", "dpo"):
            wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores[name], scores["sft"]))
            out[f"{name}_win_rate_vs_sft"] = wins / len(prompts)

        # GRPO: exact-answer accuracy (greedy) on the task's held-out prompts, SFT model vs GRPO model
        task = self.task()
        eval_prompts = task.eval_prompts()
        grpo = load_model(self.p("grpo", "ckpt"), device=device)
        for name, m in (("sft", models["sft"]), ("grpo", grpo)):
            rs = rollout(m, tok, eval_prompts, n=1, max_new_tokens=8, temperature=0.0, recompute_logprobs=False)
            out[f"arith_acc_{name}"] = sum(task.reward(p, r.text) for p, r in zip(eval_prompts, rs)) / len(rs)

        # sample chats with the final chat model (DPO) and the SFT model, greedy-ish, English and Chinese
        samples = []
        for name in ("sft", "dpo"):
            rs = rollout(models[name], tok, CHAT_PROMPTS, n=1, max_new_tokens=max_new, temperature=0.0,
                         recompute_logprobs=False)
            for p, r in zip(CHAT_PROMPTS, rs):
                samples.append({"model": name, "user": p[-1]["content"], "assistant": r.text})
        out["samples"] = samples
        out["heldout_examples"] = [
            {"user": prompts[i][-1]["content"][:200], **{n: texts[n][i][:200] for n in texts}}
            for i in range(min(3, len(prompts)))
        ]
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return out

    # ---- report ----------------------------------------------------------------------------------------------------------

    def _report(self) -> dict:
        from .report import write_report

        path = write_report(self)
        return {"report": str(path)}


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def configure_cli(name, p):
    p.add_argument("--preset", default="cpu-small",
                   help="cpu-small (default, ~20 min on a 2-core CPU), cpu-tiny (~2 min smoke run), gpu-124m "
                        "(GPT-2-small-sized, for a CUDA machine), or a path to a speedrun TOML")
    p.add_argument("--out", default=None, help="run directory (default runs/speedrun-PRESET)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (passed to every stage)")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage (resume later)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    preset = args.preset
    out = Path(args.out or f"runs/speedrun-{Path(preset).stem.removeprefix('speedrun-')}")
    sr = Speedrun(preset, out, device=args.device)
    report = sr.run(stop_after=args.stop_after)
    if args.stop_after and args.stop_after != "report":
        print(f"stopped after {args.stop_after}; run the same command again to continue", file=sys.stderr)
        return 0
    chat = out / "dpo" / "ckpt"
    print(f"\nreport: {report}")
    print("talk to the result:")
    print(f"  pocketgpt chat --ckpt {chat}")
    print("serve it (OpenAI-compatible API + web page on http://127.0.0.1:8000):")
    print(f"  pocketgpt serve --ckpt {chat}")
    return 0
