"""Group relative policy optimisation (GRPO): RL on a checkable task without a value model.

For each prompt the policy samples a *group* of G replies (engine ``n=G``: one prefill shared by the group); each
reply gets a reward (a built-in verifiable task, or a Python ``module:function``); the advantage of a reply is its
reward normalised within its group, and every reply token is pushed by that advantage through PPO's clipped ratio::

    A_i      = (r_i − mean(r_group)) / (std(r_group) + eps)                 (all replies equal → A = 0, no signal)
    ratio_t  = π(y_t | ·) / π_old(y_t | ·)            π_old = the log-probs recorded at sampling time
    loss     = mean_i mean_t [ −min(ratio_t·A_i, clip(ratio_t, 1−ε, 1+ε)·A_i) + kl_coef · KL_t ]
    KL_t     = exp(ref_t − logp_t) − (ref_t − logp_t) − 1      (the k3 estimator, to a frozen copy of the init model)

``inner_steps > 1`` reuses one rollout for several optimizer steps (the ratio then moves away from 1 and the clip
matters). ``old_logprobs = "sampler"`` (default) takes π_old from the engine (log-probs of the raw distribution at
sampling time); ``"recompute"`` recomputes them once per rollout with the training precision (use it with bf16/fp16
autocast so that the first inner step has a ratio of exactly 1).

Rewards: ``--task arithmetic`` (``pocketgpt.tasks``: multi-digit addition / subtraction in chat form, exact-answer
reward, prompts drawn from a seed, a fixed held-out set) or ``--reward-fn module:function --prompts FILE``
(the function gets ``(prompt_messages, reply_text)`` and returns a number; prompts JSONL ``{"messages": [...]}`` or
``{"prompt": ...}``). A reward function that raises or returns a non-number stops the run with an error naming the
record (``FILE:LINE`` of the prompt); a bad prompts line is an error naming ``FILE:LINE``.

Per step: ``reward`` (mean), ``reward_std`` (within groups), ``flat_groups`` (groups whose replies all scored the same:
no signal), ``clip_frac``, ``kl``, ``reply_len``, ``truncated``.

Evaluation (every ``eval_interval`` steps and once at step 0): greedy replies to the held-out prompts —
``accuracy`` (exact answers, task) or ``eval_reward`` (mean reward, reward function); plotted as
``RUN/accuracy.png`` / ``RUN/eval_reward.png`` beside ``RUN/reward.png`` (training reward) and ``RUN/kl.png``.
Batches are a pure function of (seed, step), so a killed run resumes (``pocketgpt grpo`` again); a run stopped in
the middle of an ``inner_steps`` cycle rolls out afresh for the rest of that cycle.

CLI::

    pocketgpt grpo --init CKPT --task arithmetic [--task_digits 2] [--group-size 8] [--kl-coef 0.02] [--out runs/grpo]
    pocketgpt grpo --init CKPT --reward-fn my_rewards.py:score --prompts prompts.jsonl [--eval-prompts FILE]
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import UserError

OLD_LOGPROBS = ("sampler", "recompute")


@dataclass
class GRPOConfig:
    """The ``[grpo]`` section of a config. ``train.batch_size`` counts *prompts* per micro-batch (each with
    ``group_size`` replies)."""

    init: str = ""  # checkpoint to start from (--init overrides)
    task: str = ""  # built-in task ("arithmetic"), or empty with reward_fn + prompts
    task_digits: int = 2  # arithmetic: operands have 1..task_digits digits
    task_ops: str = "+-"  # arithmetic: operators drawn from
    n_eval: int = 64  # held-out prompts evaluated (task: its fixed eval set; prompts file: a seeded split)
    reward_fn: str = ""  # "module:function" or "path/to/file.py:function"
    prompts: str = ""  # prompts JSONL for reward_fn
    eval_prompts: str = ""  # held-out prompts JSONL (default: n_eval prompts split off --prompts)
    group_size: int = 8  # G replies per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # 0 = no reference model
    inner_steps: int = 1  # optimizer steps per rollout
    adv_eps: float = 1e-4  # the eps in (r - mean) / (std + eps)
    old_logprobs: str = "sampler"  # sampler | recompute
    eval_max_new_tokens: int = 0  # 0 = max_new_tokens

    def validate(self, where: str = "[grpo]") -> "GRPOConfig":
        def bad(name: str, msg: str) -> UserError:
            return UserError(f"{where}: field '{name}' {msg}")

        for name in ("group_size", "max_new_tokens", "inner_steps", "n_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, f"must be a positive integer, got {v!r}")
        if self.group_size < 2:
            raise bad("group_size", f"must be at least 2 (advantages compare replies in a group), got {self.group_size}")
        for name in ("top_k", "eval_max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, f"must be an integer >= 0, got {v!r}")
        if not float(self.temperature) > 0:
            raise bad("temperature", f"must be > 0 for sampling, got {self.temperature!r}")
        if not 0 < float(self.top_p) <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not 0 < float(self.clip_eps) < 1:
            raise bad("clip_eps", f"must be in (0, 1), got {self.clip_eps!r}")
        if float(self.kl_coef) < 0:
            raise bad("kl_coef", f"must be >= 0, got {self.kl_coef!r}")
        if not float(self.adv_eps) > 0:
            raise bad("adv_eps", f"must be > 0, got {self.adv_eps!r}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise bad("old_logprobs", f"must be one of {', '.join(OLD_LOGPROBS)}, got {self.old_logprobs!r}")
        if self.task and self.reward_fn:
            raise UserError("--task and --reward-fn exclude each other (a built-in task brings its own reward)")
        if not self.task and not self.reward_fn:
            raise UserError("--task or --reward-fn: required (e.g. --task arithmetic, or --reward-fn "
                            "module:function --prompts FILE)")
        if self.reward_fn and not self.prompts:
            raise UserError("--prompts: required with --reward-fn (JSONL, {\"messages\": [...]} per line)")
        if self.task and (self.prompts or self.eval_prompts):
            raise UserError("--prompts / --eval-prompts go with --reward-fn; a built-in --task makes its own prompts")
        return self


# --------------------------------------------------------------------------------------------------------------------
# the maths


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r − mean) / (std + eps) within each consecutive group of ``group_size`` rewards (population std)."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: Optional[torch.Tensor] = None,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective (+ k3 KL), averaged over each reply's tokens, then over replies.

    logp, old_logp, ref_logp, mask: (B, T) per-token values of the replies (mask False on padding);
    advantages: (B,). Returns ``(loss, metrics)``."""
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None and kl_coef > 0:
        d = (ref_logp - logp) * m
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
    lengths = m.sum(-1).clamp(min=1.0)
    loss = ((per_token * m).sum(-1) / lengths).mean()
    with torch.no_grad():
        n_tok = m.sum().clamp(min=1.0)
        clipped_now = ((ratio - 1.0).abs() > clip_eps).to(m.dtype) * m
        metrics = {"clip_frac": float(clipped_now.sum() / n_tok),
                   "ratio_mean": float((ratio * m).sum() / n_tok)}
        if kl is not None:
            metrics["kl"] = float((kl * m).sum() / n_tok)
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# prompts and rewards


class PromptSource:
    """Where training / held-out prompts and their rewards come from: a built-in task or a user function + file."""

    def __init__(self, opts: GRPOConfig, seed: int):
        self.opts = opts
        self.seed = seed
        self.task = None
        self.fn: Optional[Callable] = None
        if opts.task:
            from ..tasks import get_task

            options = {"n_eval": opts.n_eval}
            if opts.task == "arithmetic":
                options.update(digits=opts.task_digits, ops=opts.task_ops)
            self.task = get_task(opts.task, **options)
            self.eval_prompts = self.task.eval_prompts()
            self.eval_where = [f"{opts.task} held-out prompt {i + 1}" for i in range(len(self.eval_prompts))]
            self.train_prompts: list = []
            self.train_where: list = []
        else:
            from .rl_common import load_reward_fn, read_prompts_with_lines

            self.fn = load_reward_fn(opts.reward_fn)
            prompts, lines = read_prompts_with_lines(opts.prompts)
            where = [f"{opts.prompts}:{n}" for n in lines]
            if opts.eval_prompts:
                ev, ev_lines = read_prompts_with_lines(opts.eval_prompts)
                self.eval_prompts, self.eval_where = ev[: opts.n_eval], [f"{opts.eval_prompts}:{n}" for n in ev_lines]
                self.train_prompts, self.train_where = prompts, where
            else:
                order = list(range(len(prompts)))
                random.Random(seed).shuffle(order)
                n_val = min(opts.n_eval, len(prompts) // 5) if len(prompts) >= 5 else 0
                held = sorted(order[:n_val])
                rest = sorted(order[n_val:])
                self.eval_prompts, self.eval_where = [prompts[i] for i in held], [where[i] for i in held]
                self.train_prompts, self.train_where = [prompts[i] for i in rest], [where[i] for i in rest]
            if not self.train_prompts:
                raise UserError(f"{opts.prompts}: no training prompts left after the held-out split")

    @property
    def metric(self) -> str:
        return "accuracy" if self.task is not None else "eval_reward"

    def sample(self, n: int, key: int) -> tuple[list[list[dict]], list[str]]:
        """``n`` training prompts (and their record names) for rollout number ``key`` (deterministic)."""
        if self.task is not None:
            prompts = self.task.train_prompts(n, seed=self.seed * 1_000_003 + key)
            return prompts, [f"{self.opts.task} prompt {p[-1]['content']!r}" for p in prompts]
        rng = random.Random(self.seed * 1_000_003 + key)
        idx = [rng.randrange(len(self.train_prompts)) for _ in range(n)]
        return [self.train_prompts[i] for i in idx], [self.train_where[i] for i in idx]

    def reward(self, prompt: list[dict], reply: str, record: str) -> float:
        if self.task is not None:
            return self.task.reward(prompt, reply)
        from .rl_common import call_reward_fn

        return call_reward_fn(self.fn, prompt, reply, record=record)


# --------------------------------------------------------------------------------------------------------------------
# the stage


class GRPOStage:
    """Rolls out G replies per prompt with the policy, scores them, and trains with the clipped group objective."""

    name = "grpo"

    def __init__(self, model: nn.Module, tokenizer, source: PromptSource, opts: GRPOConfig, batch_size: int,
                 seed: int = 1337, eval_batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.opts = opts
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.grad_accum = 1
        self.trainer = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.ref: Optional[nn.Module] = None
        if opts.kl_coef > 0:
            from .rl_common import frozen_copy

            self.ref = frozen_copy(model)
        self._buffer: dict[tuple[int, int], dict] = {}  # (rollout number, micro) -> batch
        self._initial_eval_done = False
        self.best_metric = source.metric
        self.best_mode = "max"
        self.plot_keys = [source.metric, "reward", "kl", "reply_len", "clip_frac"]

    def setup(self, trainer) -> None:
        self.trainer = trainer
        self.grad_accum = trainer.cfg.grad_accum
        self.device, self.dtype = trainer.device, trainer.dtype
        if self.ref is not None:
            self.ref.to(trainer.device)

    # ---- rollouts ---------------------------------------------------------------------------------------------------

    def _rollout_batch(self, key: int) -> dict:
        from .. import runtime
        from .rl_common import rollout, sequence_logprobs_batch

        opts, G = self.opts, self.opts.group_size
        prompts, records = self.source.sample(self.batch_size, key)
        outs = rollout(self.model, self.tokenizer, prompts, n=G, max_new_tokens=opts.max_new_tokens,
                       temperature=opts.temperature, top_k=opts.top_k or None,
                       top_p=opts.top_p if opts.top_p < 1 else None, seed=self.seed * 7919 + key)
        rewards = torch.tensor([self.source.reward(prompts[o.prompt_index], o.text, records[o.prompt_index])
                                for o in outs], dtype=torch.float32)
        adv = group_advantages(rewards, G, opts.adv_eps)
        prompt_ids = [o.prompt_ids for o in outs]
        reply_ids = [o.reply_ids for o in outs]
        T = max(1, max(len(r) for r in reply_ids))
        old = torch.zeros(len(outs), T)
        for i, o in enumerate(outs):
            old[i, : len(o.logprobs)] = torch.tensor(o.logprobs, dtype=torch.float32)
        needs_ref = self.ref is not None
        if opts.old_logprobs == "recompute" or needs_ref:
            was = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), runtime.autocast(self.device, self.dtype):
                    if opts.old_logprobs == "recompute":
                        old = sequence_logprobs_batch(self.model, prompt_ids, reply_ids)[0].float().cpu()
                    ref = sequence_logprobs_batch(self.ref, prompt_ids, reply_ids)[0].float().cpu() if needs_ref else None
            finally:
                self.model.train(was)
        r_groups = rewards.view(-1, G)
        batch = {
            "prompt_ids": prompt_ids, "reply_ids": reply_ids, "old_logp": old, "adv": adv,
            "stats": {"reward": float(rewards.mean()), "reward_std": float(r_groups.std(-1, unbiased=False).mean()),
                      "flat_groups": float((r_groups.std(-1, unbiased=False) == 0).float().mean()),
                      "reply_len": float(sum(len(r) for r in reply_ids) / len(reply_ids)),
                      "truncated": float(sum(o.finish_reason == "length" for o in outs) / len(outs))},
        }
        if needs_ref:
            batch["ref_logp"] = ref
        return batch

    def get_batch(self, step: int, micro: int):
        from .trainer import world_info

        if step == 0 and micro == 0 and not self._initial_eval_done and self.trainer is not None:
            self._initial_eval_done = True  # the step-0 point of the accuracy curve ("before")
            self.trainer.evaluate()
        rank, world, _ = world_info()
        rollout_no = step // self.opts.inner_steps
        slot = (rollout_no * self.grad_accum + micro) * world + rank
        key = (rollout_no, micro)
        if key not in self._buffer:
            self._buffer = {k: v for k, v in self._buffer.items() if k[0] == rollout_no}
            self._buffer[key] = self._rollout_batch(slot)
        return self._buffer[key]

    def tokens_in_batch(self, batch) -> int:
        return sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["reply_ids"]))

    def loss(self, model, batch):
        from .rl_common import sequence_logprobs_batch

        logp, mask = sequence_logprobs_batch(model, batch["prompt_ids"], batch["reply_ids"])
        logp = logp.float()
        old = batch["old_logp"][:, : logp.shape[1]].to(logp.device)
        ref = batch.get("ref_logp")
        if ref is not None:
            ref = ref[:, : logp.shape[1]].to(logp.device)
        loss, metrics = grpo_loss(logp, old, batch["adv"].to(logp.device), mask, self.opts.clip_eps, ref,
                                  self.opts.kl_coef)
        metrics.update(batch["stats"])
        return loss, metrics

    # ---- evaluation -------------------------------------------------------------------------------------------------

    def evaluate(self, model) -> dict[str, float]:
        from .rl_common import rollout

        prompts = self.source.eval_prompts
        if not prompts:
            return {}
        max_new = self.opts.eval_max_new_tokens or self.opts.max_new_tokens
        scores = []
        for i in range(0, len(prompts), self.eval_batch_size):
            chunk = prompts[i: i + self.eval_batch_size]
            outs = rollout(model, self.tokenizer, chunk, n=1, max_new_tokens=max_new, temperature=0.0)
            for o in outs:
                j = i + o.prompt_index
                scores.append(self.source.reward(prompts[j], o.text, self.source.eval_where[j]))
        return {self.source.metric: sum(scores) / len(scores)}

    def state_dict(self) -> dict:  # prompts and sampling seeds are a pure function of (seed, step)
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._initial_eval_done = True


# --------------------------------------------------------------------------------------------------------------------
# running


def run_grpo(opts: GRPOConfig, out: str | Path, train, *, run_config: Optional[dict] = None,
             resume: Optional[bool] = None, log=None) -> dict:
    """GRPO on ``opts.init`` through the Trainer; returns the final metrics plus ``initial_<metric>``."""
    from .plots import read_metrics
    from .sft import load_init
    from .trainer import Trainer

    log = log or (lambda s: print(s, file=sys.stderr))
    opts.validate()
    if not opts.init:
        raise UserError("--init: required (a chat checkpoint, e.g. one SFT'd on the task format)")
    source = PromptSource(opts, train.seed)  # reads prompts / imports the reward function before the model loads
    model, tokenizer, added = load_init(opts.init)
    if added:
        log(f"grpo: added chat tokens {' '.join(added)} to the tokenizer (was --init an SFT checkpoint?)")
    stage = GRPOStage(model, tokenizer, source, opts, train.batch_size, seed=train.seed)
    cfg = dict(run_config or {})
    cfg.update({"grpo": {**asdict(opts), "init": str(opts.init)}, "train": asdict(train)})
    what = f"task {opts.task}" if opts.task else f"reward {opts.reward_fn} on {opts.prompts}"
    log(f"grpo: {model.num_params() / 1e6:.2f}M parameters, {what}, {train.batch_size} prompts x "
        f"{opts.group_size} replies per micro-batch, {len(source.eval_prompts)} held-out prompts -> {out}")
    trainer = Trainer(model, stage, train, out, tokenizer=tokenizer, run_config=cfg, resume=resume)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    curve = [(r["step"], r[source.metric]) for r in read_metrics(out) if source.metric in r]
    if curve:
        result[f"initial_{source.metric}"] = curve[0][1]
        result["curve"] = curve
    return result


# --------------------------------------------------------------------------------------------------------------------
# command line

TRAIN_DEFAULTS = dict(max_steps=200, batch_size=8, lr=1e-5, min_lr=1e-6, warmup_steps=5, weight_decay=0.0,
                      schedule="constant", eval_interval=20, eval_batches=1, ckpt_interval=20, log_interval=1)


def _sections():
    from .trainer import TrainConfig

    return {"grpo": GRPOConfig, "train": TrainConfig}


def configure_cli(name: str, parser) -> None:
    from ..config import add_config_arguments, add_resume_arguments

    parser.add_argument("--init", metavar="CKPT", default=None, help="chat checkpoint to improve")
    parser.add_argument("--task", default=None, help="built-in verifiable task: arithmetic")
    parser.add_argument("--reward-fn", "--reward_fn", dest="reward_fn", default=None, metavar="MODULE:FUNCTION",
                        help="Python reward function (prompt_messages, reply_text) -> number; module or file.py")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="prompts JSONL for --reward-fn")
    parser.add_argument("--eval-prompts", "--eval_prompts", dest="eval_prompts", default=None, metavar="FILE",
                        help="held-out prompts JSONL (default: split off --prompts)")
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=None, metavar="G",
                        help="replies sampled per prompt (default 8)")
    parser.add_argument("--kl-coef", "--kl_coef", dest="kl_coef", type=float, default=None, metavar="C",
                        help="weight of the KL to the init model (k3 estimator; default 0 = none)")
    parser.add_argument("--out", default="runs/grpo", metavar="RUN",
                        help="run directory (default runs/grpo); the model ends up in RUN/ckpt")
    add_resume_arguments(parser)
    add_config_arguments(parser, _sections())
    parser.set_defaults(func=_cli_grpo)


def _cli_grpo(args) -> int:
    from ..config import config_from_args, resume_from_args

    rc = config_from_args(args, _sections())
    train = rc.rebuild("train", **TRAIN_DEFAULTS).validate()
    opts: GRPOConfig = rc["grpo"]
    for name in ("init", "task", "reward_fn", "prompts", "eval_prompts", "group_size", "kl_coef"):
        v = getattr(args, name)
        if v is not None:
            setattr(opts, name, v)
    resume = resume_from_args(args)
    result = run_grpo(opts, args.out, train, run_config=rc.to_dict(), resume=resume)
    metric = "accuracy" if opts.task else "eval_reward"
    line = f"grpo: done at step {result['step']}"
    if metric in result:
        before = result.get(f"initial_{metric}")
        line += f", held-out {metric.replace('_', ' ')} (greedy)"
        line += f" {before:.3f} -> {result[metric]:.3f}" if before is not None else f" {result[metric]:.3f}"
    print(line)
    print(f"chat with it: pocketgpt chat --ckpt {Path(args.out) / 'ckpt'}")
    return 0
