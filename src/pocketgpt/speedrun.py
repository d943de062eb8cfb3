"""``pocketgpt speedrun``: the whole pipeline on bundled data in one command, with a report card.

Every stage is the ``pocketgpt`` command a user would type, run as a child process with the preset's options
(``configs/speedrun-PRESET.toml``, one table per stage): its own progress bar, peak memory (``wait4``'s max RSS) and
resume; a rerun with the same ``--out`` skips finished stages (``RUN/speedrun_state.json``). The chat model at the end
is DPO's, the most stable of the three methods at this size.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .io import atomic_write_text, read_json, write_json

PRESETS = ("cpu-tiny", "cpu-small", "gpu-124m")
STAGES = ("tokenizer", "prepare", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "grpo", "rm_hh", "eval", "report")

# Sample prompts for the report's chats (English and Chinese)
CHAT_PROMPTS = ["Hello! How are you today?", "What do you like to do on weekends?", "你好，你叫什么名字？",
                "你喜欢看什么电影？", "What is 23 + 45?"]


# ---- presets --------------------------------------------------------------------------------------------------------


def load_preset(name: str) -> dict[str, dict[str, Any]]:
    """Read ``speedrun-NAME.toml`` (a preset name) or a TOML path; one table per stage."""
    from .config import read_toml, resolve_config_path

    path = resolve_config_path(f"speedrun-{name}" if name in PRESETS else name)
    data = read_toml(path)
    unknown = sorted(set(data) - set(STAGES) - {"speedrun", "task"})
    if unknown:
        sections = ", ".join(("speedrun", "task") + STAGES)
        raise UserError(f"{path}: unknown section [{unknown[0]}] (sections: {sections})")
    data.setdefault("speedrun", {})
    data["_path"] = {"path": str(path)}
    return data


def _opts(table: dict[str, Any]) -> list[str]:
    """A TOML table as command-line options: ``{"n_layer": 2, "compile": false}`` → ``--n_layer 2 --compile false``."""
    out: list[str] = []
    for k, v in table.items():
        values = v if isinstance(v, list) else [str(v).lower() if isinstance(v, bool) else v]
        out += [f"--{k}", *map(str, values)]
    return out


# ---- running stages -------------------------------------------------------------------------------------------------


def run_child(args: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run ``python -m pocketgpt ARGS``, its output to the terminal and to ``log_path``; returns (exit code, wall
    seconds, peak RSS in MB of that child alone)."""
    t0 = time.time()
    with open(log_path, "ab") as log:
        log.write(f"$ pocketgpt {shlex.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "pocketgpt", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
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


# ---- the pipeline ---------------------------------------------------------------------------------------------------


class Speedrun:
    def __init__(self, preset: str, out: str | Path, *, device: str = "auto"):
        self.preset_name = preset
        self.preset = load_preset(preset)
        self.out = Path(out)
        self.device = device
        self.state_path = self.out / "speedrun_state.json"
        self.log_path = self.out / "speedrun.log"
        self.state: dict = {"preset": preset, "done": {}}

    def load_state(self) -> None:
        if self.state_path.exists():
            st = read_json(self.state_path)
            if st.get("preset") != self.preset_name:
                raise UserError(f"{self.state_path}: this run directory belongs to preset {st.get('preset')!r}, not "
                                f"{self.preset_name!r}; use another --out (or the same --preset)")
            self.state = st

    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def table(self, stage: str) -> dict:
        return dict(self.preset.get(stage, {}))

    def task_options(self) -> dict:
        """The ``[task]`` table without its name (``n_eval`` included: the report's held-out prompts)."""
        return {k: v for k, v in self.table("task").items() if k != "name"}

    def task_name(self) -> str:
        return str(self.table("task").get("name", "arithmetic"))

    def task(self):
        from .tasks import get_task

        return get_task(self.task_name(), self.task_options())

    def task_args(self) -> list[str]:
        """``--task NAME --task_options k=3,...`` for a stage command; each stage sets its own ``--n_eval`` /
        ``--prompts`` (a prefix of the same held-out set; training prompts avoid the whole held-out pool)."""
        opts = ",".join(f"{k}={v}" for k, v in self.task_options().items() if k != "n_eval")
        return ["--task", self.task_name(), "--task_options", opts]

    def _common(self) -> list[str]:
        return ["--device", self.device] if self.device != "auto" else []

    def _train(self, stage: str, t: dict, cfg: str, *args: str, prog: str = "", init: str = "sft") -> list[str]:
        """``pocketgpt PROG --init RUN/INIT/ckpt ARGS --config CFG --out RUN/STAGE`` + the rest of table ``t``."""
        return [prog or stage, "--init", str(self.p(init, "ckpt")), *args, "--config", t.pop("config", cfg),
                "--out", str(self.p(stage)), *_opts(t), *self._common()]

    def cmd_tokenizer(self) -> list[str]:
        t = self.table("tokenizer")
        builtins = [a for b in t.pop("builtin", ["shakespeare", "shuihu", "chat"]) for a in ("--builtin", b)]
        args = ["tokenizer", "train", "--kind", str(t.pop("kind", "bpe")), "--vocab-size",
                str(t.pop("vocab_size", 4096)), "--out", str(self.p("tokenizer")), *builtins]
        if t:
            raise UserError(f"{self.preset['_path']['path']}: [tokenizer] unknown key '{next(iter(t))}'")
        return args

    def cmd_prepare(self) -> list[str]:
        t = self.table("prepare")
        builtins = [a for b in t.pop("builtin", ["shakespeare", "shuihu"]) for a in ("--builtin", b)]
        return ["prepare", "--tokenizer", str(self.p("tokenizer")), "--out", str(self.p("data")), *builtins, *_opts(t)]

    def cmd_pretrain(self) -> list[str]:
        t = self.table("pretrain")
        return ["pretrain", "--config", t.pop("config", "shakespeare-char"), "--dir", str(self.p("data")),
                "--out", str(self.p("pretrain")), *_opts(t), *self._common()]

    def cmd_sft(self) -> list[str]:
        """SFT on worked examples of the task (training problems only), then the dialogues: the task's examples come
        first, so a max_conversations cap (cpu-tiny) keeps some of them."""
        path = self.p("task_sft.jsonl")
        convs = self.task().sft_conversations(int(self.table("speedrun").get("task_sft", 400)), seed=1)
        atomic_write_text(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
        t = self.table("sft")
        return self._train("sft", t, "sft-small", "--data", str(path), *t.pop("data", ["chat_en", "chat_zh"]),
                           init="pretrain")

    def cmds_pairs(self) -> list[list[str]]:
        """The SFT model answers task prompts (sampled), the checker labels the replies, pairs are formed: from
        training prompts for RM / DPO, and from the held-out prompts for the RM's held-out accuracy."""
        t = self.table("pairs")
        n_train = int(t.pop("prompts", 1000))
        base = ["pairs", "--ckpt", str(self.p("sft", "ckpt")), *self.task_args(), *_opts(t), *self._common()]
        return [base + ["--split", split, "--prompts", str(n), "--out", str(self.p(f"pairs_{name}.jsonl")),
                        "--stats", str(self.p(f"pairs_{name}.stats.json"))]
                for split, name, n in (("train", "train", n_train), ("eval", "heldout", self.task().n_eval))]

    def split_hh(self) -> tuple[Path, Path]:
        """Bundled HH-RLHF pairs → training pairs + held-out pairs (the chat reward model's accuracy)."""
        from .records import builtin_path, read_text_file

        train_p, held_p = self.p("hh_train.jsonl"), self.p("hh_heldout.jsonl")
        if train_p.exists() and held_p.exists():
            return train_p, held_p
        lines = [ln for ln in read_text_file(builtin_path("prefs")).splitlines() if ln.strip()]
        n_held = int(self.table("speedrun").get("hh_heldout_pairs", 60))
        atomic_write_text(train_p, "\n".join(lines[:-n_held]) + "\n")
        atomic_write_text(held_p, "\n".join(lines[-n_held:]) + "\n")
        return train_p, held_p

    def cmd_rm(self) -> list[str]:
        return self._train("rm", self.table("rm"), "rm-tiny", "--data", str(self.p("pairs_train.jsonl")),
                           "--val-data", str(self.p("pairs_heldout.jsonl")))

    def cmd_rm_hh(self) -> list[str]:
        train_p, held_p = self.split_hh()
        return self._train("rm_hh", self.table("rm_hh"), "rm-tiny", "--data", str(train_p), "--val-data", str(held_p),
                           prog="rm")

    def cmd_ppo(self) -> list[str]:
        """PPO against the *trained* reward model (never the checker): prompts from the task's training problems;
        the checker only monitors held-out accuracy (``eval_accuracy`` beside ``eval_reward``)."""
        return self._train("ppo", self.table("ppo"), "ppo-tiny", "--reward", str(self.p("rm", "ckpt")),
                           *self.task_args())

    def cmd_dpo(self) -> list[str]:
        return self._train("dpo", self.table("dpo"), "dpo-tiny", "--data", str(self.p("pairs_train.jsonl")))

    def cmd_grpo(self) -> list[str]:
        return self._train("grpo", self.table("grpo"), "grpo-arithmetic", *self.task_args())

    def run(self, stop_after: Optional[str] = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.load_state()
        t_all = time.time()
        for i, name in enumerate(STAGES, 1):
            if name in self.state["done"] and name != "report":
                print(f"[{i}/{len(STAGES)}] {name}: done earlier, skipped", file=sys.stderr)
                continue
            print(f"\n[{i}/{len(STAGES)}] {name} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            if name in ("eval", "report"):
                info = getattr(self, f"_{name}")()
            else:  # stage NAME runs the command(s) of cmd_NAME (cmds_pairs: two)
                info = self._children(name, self.cmds_pairs() if name == "pairs" else [getattr(self, f"cmd_{name}")()])
            info.setdefault("wall_s", round(time.time() - t0, 1))
            self.state["done"][name] = info
            write_json(self.state_path, self.state)
            if stop_after == name:
                break
        self.state["total_wall_s"] = round(sum(v.get("wall_s", 0) for v in self.state["done"].values()), 1)
        self.state["this_invocation_s"] = round(time.time() - t_all, 1)
        write_json(self.state_path, self.state)
        return self.p("report.md")

    def _children(self, name: str, commands: list[list[str]]) -> dict:
        wall, peak = 0.0, 0.0
        for args in commands:
            rc, w, pk = run_child(args, self.log_path)
            if rc != 0:
                raise UserError(f"stage '{name}' failed (exit {rc}); its output is in {self.log_path}. Fix the cause "
                                f"and run the same speedrun command again: finished stages are skipped and '{name}' "
                                f"resumes from its last checkpoint")
            wall += w
            peak = max(peak, pk)
        return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1),
                "command": "\n".join(f"pocketgpt {shlex.join(args)}" for args in commands)}

    def _eval(self) -> dict:
        """Every model against ground truth it did not optimise, side by side on the same held-out prompts:
        greedy task accuracy (the checker), the task reward model's score, KL to the SFT model, reply length; the
        reward models' held-out pairwise accuracy; sample chats as ``pocketgpt chat`` samples them."""
        import resource

        import torch

        from .chat import render
        from .checkpoint import load_model
        from .runtime import pick_device
        from .tokenizer import load_tokenizer_for
        from .train.reward import load_reward_model

        ev = self.table("eval")
        seed = int(ev.get("seed", 0))
        device = pick_device(self.device)
        tok = load_tokenizer_for(self.p("sft", "ckpt"))
        task = self.task()
        prompts = task.eval_prompts()
        max_new = int(ev.get("task_max_new_tokens", 8))
        rm = load_reward_model(self.p("rm", "ckpt"), device=device)
        models = {n: load_model(self.p(n, "ckpt"), device=device) for n in ("sft", "ppo", "dpo", "grpo")}
        out: dict[str, Any] = {"heldout_prompts": len(prompts), "per_model": {}}

        with torch.inference_mode():
            for n, m in models.items():
                greedy = self._generate(m, tok, prompts, max_new, temperature=0.0)
                texts = [t for t, _ in greedy]
                scores = rm.score_ids([render(p + [{"role": "assistant", "content": r}], tok)[0]
                                       for p, r in zip(prompts, texts)], tok.pad_id, batch_size=64)
                if n == "sft":  # KL to itself
                    kl = [0.0] * len(prompts)
                else:
                    kl = self._seq_kl(m, models["sft"], tok, prompts, max_new, seed + 7)
                out["per_model"][n] = {"correct": [task.reward(p, r) > 0 for p, r in zip(prompts, texts)],
                                       "rm_scores": scores, "kl": kl, "lengths": [len(ids) for _, ids in greedy],
                                       "examples": [{"user": p[-1]["content"], "reply": r} for p, r in
                                                    zip(prompts[:4], texts)]}

        # the reward models: pairwise accuracy on pairs of held-out prompts (task) / held-out HH-RLHF pairs
        out["rm_heldout"] = self._pair_accuracy(rm, tok, self.p("pairs_heldout.jsonl"))
        del rm
        out["rm_hh_heldout"] = self._pair_accuracy(load_reward_model(self.p("rm_hh", "ckpt"), device=device), tok,
                                                   self.split_hh()[1])

        out["samples"] = self._sample_chats(models, tok, seed)
        if ev.get("standard_tasks"):
            chat = str(self.table("speedrun").get("chat_model", "dpo"))
            out["standard_tasks"] = standard_tasks({n: self.p(n, "ckpt") for n in dict.fromkeys(("sft", chat))},
                                                   ev["standard_tasks"], ev.get("standard_tasks_include"),
                                                   ev.get("standard_tasks_limit"))
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return out

    @staticmethod
    def _generate(model, tok, prompts, max_new: int, temperature: float, seed: int = 0) -> list[tuple[str, list[int]]]:
        """(text, token ids as written: the closing ``<|end|>`` included when the model stopped) per prompt."""
        from .chat import render, stop_id
        from .engine import generate

        end = stop_id(tok)
        out = []
        for b, i in enumerate(range(0, len(prompts), 64)):
            ids = [render(p, tok, add_generation_prompt=True)[0] for p in prompts[i: i + 64]]
            res = generate(model, ids, max_new_tokens=max_new, temperature=temperature, stop_ids=[end],
                           seed=seed + b, return_logprobs=True)
            for r in res:
                toks = [int(t) for t in r.tokens]
                out.append((tok.decode(toks), toks + ([end] if r.finish_reason == "stop" else [])))
        return out

    def _seq_kl(self, model, ref, tok, prompts, max_new: int, seed: int) -> list[float]:
        """KL(model || ref) per prompt, estimated on one reply sampled from the model at temperature 1: the sum over
        the tokens it wrote of log pi(y_t) - log pi_ref(y_t) (TRL's objective/kl)."""
        from .chat import render
        from .engine import pack_replies, token_logprobs

        replies = [ids for _, ids in self._generate(model, tok, prompts, max_new, temperature=1.0, seed=seed)]
        out: list[float] = []
        for i in range(0, len(prompts), 64):
            ps = [render(p, tok, add_generation_prompt=True)[0] for p in prompts[i: i + 64]]
            packed = pack_replies(ps, replies[i: i + 64], pad_id=tok.pad_id, device=next(model.parameters()).device)
            out += (token_logprobs(model, *packed)[0] - token_logprobs(ref, *packed)[0]).sum(-1).tolist()
        return out

    def _pair_accuracy(self, rm, tok, path: Path) -> dict:
        from .chat import render

        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        block = rm.config.block_size

        def ids(prompt, reply):
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return render(msgs + [{"role": "assistant", "content": reply}], tok)[0][-block:]  # keep the reply's end

        sc = rm.score_ids([ids(r["prompt"], r["chosen"]) for r in rows], tok.pad_id, batch_size=32)
        sr = rm.score_ids([ids(r["prompt"], r["rejected"]) for r in rows], tok.pad_id, batch_size=32)
        return {"correct": [a > b for a, b in zip(sc, sr)], "margins": [a - b for a, b in zip(sc, sr)]}

    def _sample_chats(self, models, tok, seed: int) -> list[dict]:
        """Replies to the report's chat prompts, sampled with ``pocketgpt chat``'s defaults (whatever they are)."""
        from .chat import ChatSession
        from .report import longest_run

        max_new = int(self.table("eval").get("max_new_tokens", 48))
        samples = []
        for n in ("sft", str(self.table("speedrun").get("chat_model", "dpo"))):
            for i, p in enumerate(CHAT_PROMPTS):
                reply = ChatSession(models[n], tok, max_new_tokens=max_new, seed=seed + i).reply_text(p)
                ids = [int(t) for t in tok.encode(reply)]
                samples.append({"model": n, "user": p, "assistant": reply, "token_ids": ids,
                                "tokens": len(ids), "longest_run": longest_run(ids)})
        return samples

    def _report(self) -> dict:
        from .report import write_report

        return {"report": str(write_report(self)), "json": str(self.p("report.json"))}


def standard_tasks(ckpts: dict[str, Path], tasks: list[str], include=None, limit=None) -> dict:
    """lm-evaluation-harness ``tasks`` on each checkpoint, where they are available locally: the demo never
    downloads (``HF_DATASETS_OFFLINE``), so a task missing from the local cache is listed with the reason instead."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .evaluate import run_tasks

    out: dict[str, dict] = {"results": {n: {} for n in ckpts}, "unavailable": {}}
    for task in tasks:
        for name, ckpt in ckpts.items():
            try:
                out["results"][name].update(run_tasks(ckpt, [task], include_path=include, limit=limit))
            except Exception as e:  # noqa: BLE001 - not installed, not cached, offline: all mean "not here"
                out["unavailable"][task] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                break
    return out


# ---- CLI ------------------------------------------------------------------------------------------------------------


def configure_cli(name, p):
    p.add_argument("--preset", default="cpu-small",
                   help="cpu-small (default, ~20 min on a 2-core CPU), cpu-tiny (~2 min smoke run), gpu-124m "
                        "(GPT-2-small-sized, for a CUDA machine), or a path to a speedrun TOML")
    p.add_argument("--out", default=None, help="run directory (default runs/speedrun-PRESET)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (passed to every stage)")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage (resume later)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    out = Path(args.out or f"runs/speedrun-{Path(args.preset).stem.removeprefix('speedrun-')}")
    report = Speedrun(args.preset, out, device=args.device).run(stop_after=args.stop_after)
    if args.stop_after and args.stop_after != "report":
        print(f"stopped after {args.stop_after}; run the same command again to continue", file=sys.stderr)
        return 0
    chat = out / "dpo" / "ckpt"
    print(f"\nreport: {report}\ntalk to the result:\n  pocketgpt chat --ckpt {chat}\n"
          f"serve it (OpenAI-compatible API + web page on http://127.0.0.1:8000):\n  pocketgpt serve --ckpt {chat}")
    return 0
