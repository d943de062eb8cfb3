"""On-policy RL: the one experience loop of PPO, GRPO and RLOO (rollout → reward → old / reference log-probs →
the stage's advantages → epochs × minibatches of its loss); the data flow is in docs/internals.md."""

from __future__ import annotations

import copy
import functools
import importlib
import math
import numbers
import os
import random
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import safetensors.torch
import torch
import torch.nn as nn
from pydantic import Field

from .. import runtime
from ..chat import render
from ..checkpoint import find_checkpoint, write_model
from ..config import Config
from ..engine import generate, pack_replies, token_logprobs
from ..errors import UserError
from ..records import fit, read_prompts, split
from ..tasks import get_task
from ..tokenizer import load_tokenizer_for
from .plots import read_metrics
from .reward import ScalarHead, encode_reply, load_reward_model
from .sft import load_init
from .trainer import Trainer, default_load_model


class RewardFunctionError(UserError):
    """A reward function raised or returned something that is not a finite number."""


class Prompts:
    """``(messages, record name)`` prompts: a built-in task's (fresh ones every rollout, a fixed held-out set) or a
    JSONL file's (``n_eval``, at most a fifth, held out by a seeded split unless ``eval_path`` gives them)."""

    def __init__(self, *, task=None, path: str = "", eval_path: str = "", n_eval: int = 64, seed: int = 0):
        self.task, self.seed = task, seed
        if task is not None:
            if path or eval_path:
                raise UserError("--prompts / --eval_prompts go with a reward function or model; "
                                "a built-in --task makes its own prompts")
            self.eval = [(p, f"{task.name} held-out prompt {i + 1}") for i, p in enumerate(task.eval_prompts(n_eval))]
            return
        if not path:
            raise UserError("--prompts FILE or --task NAME: required (where the prompts come from)")
        prompts = list(zip(*read_prompts(path)))
        if eval_path:
            self.train, self.eval = prompts, list(zip(*read_prompts(eval_path)))[:n_eval]
        else:
            self.train, self.eval = split(prompts, seed=seed, count=min(n_eval, len(prompts) // 5))  # <= a fifth

    def sample(self, n: int, key: int) -> list[tuple[list[dict], str]]:
        """``n`` training prompts for rollout ``key`` (a pure function of seed and key)."""
        if self.task is not None:
            prompts = self.task.train_prompts(n, seed=self.seed * 1_000_003 + key)
            return [(p, f"{self.task.name} prompt {p[-1]['content']!r}") for p in prompts]
        rng = random.Random(self.seed * 1_000_003 + key)
        return [self.train[rng.randrange(len(self.train))] for _ in range(n)]


def load_reward_fn(spec: str) -> Callable[[list[dict], str], float]:
    """Import ``"module:function"`` or ``"path/to/file.py:function"``, called as ``fn(prompt_messages, reply)``."""
    module_name, sep, fn_name = str(spec).rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"--reward_fn: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    is_file = module_name.endswith(".py") or "/" in module_name or "\\" in module_name
    if is_file and not Path(module_name).is_file():
        raise UserError(f"--reward_fn: file {module_name} not found")
    sys.path.insert(0, os.getcwd())  # the current directory counts too (as with ``python -m``)
    try:
        names = runpy.run_path(module_name) if is_file else vars(importlib.import_module(module_name))
    except Exception as e:  # noqa: BLE001 - any import failure of user code is a user error
        raise UserError(f"--reward_fn: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    finally:
        sys.path.pop(0)
    fn = names.get(fn_name)
    if not callable(fn):
        raise UserError(f"--reward_fn: module {module_name!r} has no function {fn_name!r}")
    return fn


def call_reward_fn(fn: Callable, prompt: list[dict], reply: str, *, record: str) -> float:
    """``fn(prompt, reply)`` as a finite float; ``RewardFunctionError`` naming ``record`` if it raises or returns
    anything else (a Python / numpy number or a one-element tensor is fine)."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        value = fn(prompt, reply)
    except Exception as e:  # noqa: BLE001 - report whatever the user's function raised
        raise RewardFunctionError(f"{record}: reward function {name} raised {type(e).__name__}: {e}") from None
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or getattr(value, "size", None) == 1:  # (numpy)
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    shown = repr(value)
    raise RewardFunctionError(f"{record}: reward function {name} returned "
                              f"{shown if len(shown) <= 60 else shown[:57] + '...'}, expected a finite number")


class RewardSource:
    """Scores ``(prompt messages, reply text)``: a trained reward model, a Python function or a task's checker."""

    def __init__(self, *, reward_model: str = "", reward_fn: str = "", task=None, dtype: torch.dtype = torch.float32,
                 batch_size: int = 32):
        self.rm, self.fn, self.task, self.batch_size = None, None, task, batch_size
        if reward_model and reward_fn:
            raise UserError("--reward RM_CKPT and --reward_fn exclude each other (one reward source)")
        if reward_model:
            path = find_checkpoint(reward_model)
            self.rm = load_reward_model(path, dtype=dtype).requires_grad_(False)
            self.rm_tokenizer = load_tokenizer_for(path)
            self.kind, self.description = "model", f"reward model {path}"
        elif reward_fn:
            self.fn = load_reward_fn(reward_fn)
            self.kind, self.description = "function", f"reward function {getattr(self.fn, '__name__', reward_fn)}"
        elif task is not None:
            self.kind, self.description = "task", f"the {task.name} task's checker"
        else:
            raise UserError("no reward: give --reward RM_CKPT, --reward_fn module:function or --task NAME")

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], replies: list[str], where: list[str], when: str) -> list[float]:
        """The scores; ``where`` names each prompt's record and ``when`` the step, for a reward function's errors."""
        if self.rm is not None:
            rows = [encode_reply(p, r, self.rm_tokenizer, self.rm.config.block_size) for p, r in zip(prompts, replies)]
            return self.rm.score_ids(rows, self.rm_tokenizer.pad_id, self.batch_size)
        if self.fn is None:
            return [self.task.reward(p, r) for p, r in zip(prompts, replies)]
        try:
            return [call_reward_fn(self.fn, p, r, record=w) for p, r, w in zip(prompts, replies, where)]
        except RewardFunctionError as e:
            raise RewardFunctionError(f"{e} ({when})") from None


@dataclass
class Rollout:
    """One reply. ``reply_ids`` ends with ``<|end|>`` when the model stopped by itself (it is part of what the policy
    wrote, so it is trained and scored); ``text`` excludes it."""

    prompt_ids: list[int]
    reply_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_index: int  # which prompt of the call it answers


@torch.no_grad()
def rollout(model: nn.Module, tokenizer, prompts: list[list[dict]], *, n: int = 1, max_new_tokens: int = 64,
            temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
            seed: Optional[int] = None) -> list[Rollout]:
    """``n`` replies per prompt through the engine (prompt-major rows); ``temperature=0`` is greedy. Prompts are
    rendered with the chat template and lose their oldest tokens to leave room for the reply."""
    end_id = tokenizer.token_id("<|end|>")
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block - 8))
    prompt_ids = [fit(render(m, tokenizer, add_generation_prompt=True)[0], block, max_new_tokens)[0] for m in prompts]
    results = generate(model, prompt_ids, return_logprobs=True, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, n=n, stop_ids=end_id, seed=seed)
    out = []
    for row, res in enumerate(results):
        tokens = [int(t) for t in res.tokens]  # (finish_reason: "stop" or "length")
        end = [end_id] if res.finish_reason == "stop" else []
        out.append(Rollout(prompt_ids[row // n], tokens + end, tokenizer.decode(tokens), res.finish_reason, row // n))
    return out


class Policy(nn.Module):
    """The policy GPT (+ PPO's value head on its backbone): ``forward`` gives per-token log-probs of replies, and
    everything trained happens inside it, so DDP sees every parameter it reduces."""

    def __init__(self, gpt: nn.Module, value_head: bool = False, temperature: float = 1.0):
        super().__init__()
        self.gpt, self.temperature = gpt, temperature
        self.value_head = ScalarHead(gpt.config.n_embd) if value_head else None

    def forward(self, idx, pos, targets, mask):
        """→ ``(logp, entropy, values or None)``, each (B, T), for the reply positions of a packed batch."""
        logp, ent, h = token_logprobs(self.gpt, idx, pos, targets, mask, temperature=self.temperature,
                                      entropy=True, hidden=self.value_head is not None)
        return logp, ent, (self.value_head(h) * mask if self.value_head is not None else None)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        return self.gpt.flops_per_token(seq_len)


VALUE_HEAD_FILE = "value_head.safetensors"


def save_policy(model: Policy, directory: Path) -> None:
    """The policy as a plain GPT checkpoint (chat / export load it) + ``value_head.safetensors`` (PPO, for resume)."""
    write_model(model.gpt, directory)
    if model.value_head is not None:
        safetensors.torch.save_model(model.value_head, str(Path(directory) / VALUE_HEAD_FILE))


def load_policy(model: Policy, directory: Path) -> None:
    default_load_model(model.gpt, directory)
    if model.value_head is not None and (Path(directory) / VALUE_HEAD_FILE).is_file():
        safetensors.torch.load_model(model.value_head, str(Path(directory) / VALUE_HEAD_FILE))


def frozen_copy(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A reference model: a deep copy in eval mode with every parameter frozen (optionally cast, e.g. bf16)."""
    return copy.deepcopy(model).to(dtype).eval().requires_grad_(False)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


class RLConfig(Config):
    """Options every on-policy stage has (sections ``[ppo]`` / ``[grpo]`` add their own)."""

    section: ClassVar[str] = "rl"
    init: str = Field("", description="the chat (SFT) checkpoint to improve; also the frozen reference")
    task: str = ""  # built-in task: training + held-out prompts; its checker is the reward unless reward/reward_fn
    task_options: str = ""  # the task's options, "name=value,..." (e.g. "k=3,digits=2"; n_eval is --n_eval)
    reward: str = ""  # a reward-model checkpoint (pocketgpt rm)
    reward_fn: str = ""  # or a Python reward "module:function" / "path/file.py:function"
    prompts: str = ""  # prompts JSONL (without --task)
    eval_prompts: str = ""  # held-out prompts JSONL (default: n_eval prompts split off --prompts)
    n_eval: int = Field(64, ge=1)  # held-out prompts evaluated (greedy) at every evaluation
    rollout_prompts: int = Field(16, ge=1)  # prompts per rollout, per process
    samples_per_prompt: int = Field(1, ge=1)  # replies sampled per prompt
    epochs: int = Field(1, ge=1)  # passes over each rollout's replies
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)  # rollouts are sampled; log-probs, ratios and KL use logits / temperature
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    kl_coef: float = Field(0.05, ge=0)  # weight of the KL to the reference (0 = no reference model)
    clip_range: float = Field(0.2, gt=0, lt=1)  # ε of the clipped policy ratio
    eval_max_new_tokens: int = Field(0, ge=0)  # 0 = max_new_tokens
    score_batch_size: int = Field(32, ge=1)  # rows per no-grad forward (reward model, evaluation)
    seed: int = 0


class OnlineStage:
    """The Trainer's stage for on-policy RL. A subclass sets ``name`` and implements ``advantages(buf, raw,
    stopped)`` (fills ``buf["advantages"]`` (+ ``"returns"``), returns metrics) and ``policy_loss(model, batch)``."""

    value_head = False  # PPO: the policy carries a value head
    best_mode = "max"

    @staticmethod
    def dtypes(cfg) -> tuple:
        """Precisions of the frozen reference (None: as the policy) and of the reward model."""
        return None, torch.float32

    def __init__(self, cfg: RLConfig, policy: Policy, tokenizer, prompts: Prompts, reward: RewardSource,
                 reference: Optional[nn.Module]):
        self.cfg, self.model, self.tokenizer = cfg, policy, tokenizer
        self.prompts, self.reward, self.reference, self.task = prompts, reward, reference, prompts.task
        self.rows = cfg.rollout_prompts * cfg.samples_per_prompt  # replies per rollout and process
        self.best_metric = "eval_accuracy" if self.task is not None else "eval_reward"
        self.iteration = -1  # the rollout the buffer holds
        self.buffer: dict[str, torch.Tensor] = {}
        self.perms: Optional[torch.Tensor] = None
        self.stats: dict[str, float] = {}
        self._evaluated_start = False

    def setup(self, trainer) -> None:
        self.trainer, self.device = trainer, trainer.device
        self.batch_size, self.grad_accum = trainer.cfg.batch_size, trainer.cfg.grad_accum
        per_step = self.batch_size * self.grad_accum
        if self.rows % per_step:
            raise UserError(f"[{self.name}] rollout_prompts × samples_per_prompt = {self.rows} replies per rollout "
                            f"must be a multiple of [train] batch_size × grad_accum = {per_step} (one minibatch per "
                            "step)")
        self.minibatches = self.rows // per_step
        self.steps_per_rollout = self.cfg.epochs * self.minibatches
        for frozen in (self.reference, self.reward.rm):
            if frozen is not None:
                frozen.to(self.device)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "stats": self.stats, "evaluated_start": True}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state.get("iteration", -1))
        self.stats = dict(state.get("stats", {}))
        self._evaluated_start = bool(state.get("evaluated_start", True))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The buffer of the current rollout: a run killed between its minibatches resumes on the same replies."""
        return {**self.buffer, "perms": self.perms} if self.buffer else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.buffer = {k: v for k, v in tensors.items() if k != "perms"}  # (empty: get_batch rolls out afresh)
        self.perms = tensors.get("perms")

    def tokens_in_batch(self, batch) -> int:
        return int(batch["mask"].sum())

    def _slice(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffer rows of one minibatch, trimmed to the longest reply and sequence among them."""
        batch = {k: v[rows] for k, v in self.buffer.items()}
        T = max(1, int(batch["mask"].sum(1).max()))
        L = max(1, int((batch["pos"][:, :T].max(1).values + 2).max()))
        return {k: v if v.dim() == 1 else v[:, :L] if k == "idx" else v[:, :T] for k, v in batch.items()}

    @torch.no_grad()
    def make_experience(self, iteration: int, step: int) -> None:
        cfg = self.cfg
        key = iteration * self.trainer.world_size + self.trainer.rank
        prompts = self.prompts.sample(cfg.rollout_prompts, key)
        with torch.autocast(self.device.type, enabled=False):  # sample in the weights' precision
            rolls = rollout(self.model.gpt, self.tokenizer, [p for p, _ in prompts], n=cfg.samples_per_prompt,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, seed=cfg.seed * 7919 + key)
        asked = [prompts[r.prompt_index] for r in rolls]
        scores = self.reward([p for p, _ in asked], [r.text for r in rolls], [w for _, w in asked], f"step {step + 1}")
        idx, pos, targets, mask = pack_replies([r.prompt_ids for r in rolls], [r.reply_ids for r in rolls],
                                               self.tokenizer.pad_id)
        self.buffer = {"idx": idx, "pos": pos, "targets": targets, "mask": mask}
        g = torch.Generator().manual_seed(cfg.seed * 31 + key)
        self.perms = torch.stack([torch.randperm(len(rolls), generator=g) for _ in range(cfg.epochs)])
        # old / reference log-probs (and values) on exactly the first epoch's minibatches: the first step's ratio is 1
        old, ref, val = (torch.zeros(targets.shape) for _ in range(3))
        self.model.eval()
        with runtime.autocast(self.device, self.trainer.dtype):
            for rows in self.perms[0].split(self.batch_size):  # the first epoch's micro-batches, in order
                b = {k: v.to(self.device) for k, v in self._slice(rows).items()}
                args = (b["idx"], b["pos"], b["targets"], b["mask"])
                lp, _, v = self.model(*args)
                t = lp.size(1)
                old[rows, :t] = lp.float().cpu()
                if v is not None:
                    val[rows, :t] = v.float().cpu()
                if self.reference is not None:
                    rl, _, _ = token_logprobs(self.reference, *args, temperature=cfg.temperature)
                    ref[rows, :t] = rl.float().cpu()
        self.model.train()
        self.buffer.update(old_logp=old, ref_logp=ref if self.reference is not None else old.clone(), values=val)
        raw = torch.tensor(scores, dtype=torch.float32)
        stopped = torch.tensor([r.finish_reason == "stop" for r in rolls])
        length = mask.sum(1).float().mean()
        self.stats = {"objective/scores": float(raw.mean()), "completions/mean_length": float(length),
                      "completions/clipped_ratio": float((~stopped).float().mean())}
        self.stats.update(self.advantages(self.buffer, raw, stopped))
        self.iteration = iteration

    def get_batch(self, step: int, micro: int):
        if step == 0 and micro == 0 and not self._evaluated_start:
            self._evaluated_start = True  # the "before" point of the held-out curves
            self.trainer.evaluate()
        iteration, local = divmod(step, self.steps_per_rollout)
        if iteration != self.iteration or not self.buffer:
            self.make_experience(iteration, step)
        epoch, j = divmod(local, self.minibatches)
        return self._slice(self.perms[epoch].split(self.batch_size)[j * self.grad_accum + micro])

    def loss(self, model, batch):
        loss, metrics = self.policy_loss(model, batch)
        return loss, {**metrics, **self.stats}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Greedy replies to the held-out prompts: the task's accuracy (when there is a task) and the reward source's
        mean score (the reward model's, for PPO on an RM: the pair of curves shows reward hacking)."""
        if not self.prompts.eval:
            return {}
        prompts, where = zip(*self.prompts.eval)
        max_new = self.cfg.eval_max_new_tokens or self.cfg.max_new_tokens
        rolls, scores = [], []
        with torch.autocast(self.device.type, enabled=False):
            for i in range(0, len(prompts), self.cfg.score_batch_size):
                chunk = prompts[i: i + self.cfg.score_batch_size]
                rs = rollout(model.gpt, self.tokenizer, chunk, n=1, max_new_tokens=max_new, temperature=0.0)
                scores += self.reward(chunk, [r.text for r in rs], where[i: i + len(chunk)],
                                      f"evaluation at step {self.trainer.step}")
                rolls += rs
        out = {"eval_mean_length": sum(len(r.reply_ids) for r in rolls) / len(rolls)}
        if self.task is not None:
            out["eval_accuracy"] = sum(self.task.reward(p, r.text) for p, r in zip(prompts, rolls)) / len(rolls)
        if self.reward.kind != "task":
            out["eval_reward"] = sum(scores) / len(scores)
        return out


def run_online(stage_cls, cfg: RLConfig, out: str | Path, run_config, *, resume: Optional[bool] = None) -> dict:
    """Load ``cfg.init``, build prompts / reward / reference, and train ``stage_cls`` with the one Trainer."""
    section = stage_cls.name
    if run_config["train"].parallel == "fsdp":  # FSDP forwards are collective: every rank must decode in step
        raise UserError(f"{section}: train.parallel = fsdp is not supported: rollouts decode a different number of "
                        "tokens on each rank; use ddp")
    if not cfg.init:
        raise UserError("--init: required (the chat checkpoint to improve, e.g. runs/sft/ckpt)")
    task = get_task(cfg.task, cfg.task_options, n_eval=cfg.n_eval) if cfg.task else None
    prompts = Prompts(task=task, path=cfg.prompts, eval_path=cfg.eval_prompts, n_eval=cfg.n_eval, seed=cfg.seed)
    ref_dtype, rm_dtype = stage_cls.dtypes(cfg)
    reward = RewardSource(reward_model=cfg.reward, reward_fn=cfg.reward_fn, task=task, dtype=rm_dtype,
                          batch_size=cfg.score_batch_size)
    log = functools.partial(print, file=sys.stderr)  # (every rank)
    gpt, tokenizer, _ = load_init(cfg.init, log, section)
    reference = frozen_copy(gpt, ref_dtype) if cfg.kl_coef > 0 else None
    policy = Policy(gpt, value_head=stage_cls.value_head, temperature=cfg.temperature)
    stage = stage_cls(cfg, policy, tokenizer, prompts, reward, reference)
    trainer = Trainer(policy, stage, run_config["train"], out, tokenizer=tokenizer, save_model=save_policy,
                      load_model=load_policy, run_config=run_config.to_dict(), resume=resume)
    log(f"{section}: {gpt.num_params() / 1e6:.2f}M parameters; prompts: "
        f"{task.name + ' task' if task is not None else cfg.prompts}, {len(prompts.eval)} held out; reward: "
        f"{reward.description}; {stage.rows} replies per rollout and process → {stage.steps_per_rollout} optimizer "
        f"steps; reference: {'frozen copy of --init' if reference is not None else 'none (kl_coef 0)'}")
    try:
        result = trainer.fit()
    except RewardFunctionError as e:
        saved = f"the last checkpoint is in {trainer.ckpt_dir}"  # (ranks may not agree on a failure: no collective)
        if trainer.world_size == 1:  # save the weights after the last completed step: the same command resumes
            trainer.save_checkpoint()
            saved = f"checkpoint of step {trainer.step} saved in {trainer.ckpt_dir}"
        raise RewardFunctionError(f"{e}; stopped; {saved}") from None
    finally:
        trainer.close()
    curve = [r for r in read_metrics(out) if stage.best_metric in r]
    if curve:
        result[f"initial_{stage.best_metric}"] = curve[0][stage.best_metric]
    return result
