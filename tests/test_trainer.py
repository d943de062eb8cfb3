"""The one training loop: schedule, optimizer groups, checkpoints (atomic, resumable), divergence, Ctrl-C, configs."""

import json
import math
import os
import signal

import pytest
import torch

from conftest import tiny_config
from pocketgpt import GPT, UserError
from pocketgpt.checkpoint import load_model, save_model, write_model
from pocketgpt.config import dump_toml, load_config
from pocketgpt.train.trainer import Trainer, TrainConfig, TrainingDiverged, lr_at


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and far faster when other processes load the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CopyStage:
    """Learn to copy a fixed random sequence: enough to see the loss fall in a few steps."""

    name = "copytest"

    def __init__(self, vocab=97, T=16, B=4, nan_at=None, interrupt_at=None):
        self.data = (torch.arange(512) * 7) % 23  # a fixed pattern: the next token is predictable
        self.T, self.B, self.nan_at, self.interrupt_at = T, B, nan_at, interrupt_at
        self.calls = 0

    def get_batch(self, step, micro):
        g = torch.Generator().manual_seed(1000 * step + micro)
        ix = torch.randint(0, len(self.data) - self.T - 1, (self.B,), generator=g)
        x = torch.stack([self.data[i : i + self.T] for i in ix])
        y = torch.stack([self.data[i + 1 : i + self.T + 1] for i in ix])
        return x, y

    def loss(self, model, batch):
        self.calls += 1
        _, loss = model(*batch)
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"calls": float(self.calls)}

    def evaluate(self, model):
        x, y = self.get_batch(10**6, 0)
        loss = float(model(x, y)[1])
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def on_step_end(self, step, model, metrics):
        if self.interrupt_at == step:
            os.kill(os.getpid(), signal.SIGINT)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def cfg(**kw):
    base = dict(max_steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, dtype="fp32", device="cpu",
                eval_interval=3, ckpt_interval=3, log_interval=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warmup_cosine_linear_constant():
    c = TrainConfig(max_steps=100, batch_size=1, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(c, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)  # to min_lr
    assert lr_at(c, 55) == pytest.approx(0.55)  # cosine midpoint = (lr + min_lr) / 2
    lin = TrainConfig(max_steps=100, batch_size=1, lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(lin, 25) == pytest.approx(0.75)
    const = TrainConfig(max_steps=100, batch_size=1, lr=1.0, warmup_steps=0, schedule="constant")
    assert lr_at(const, 90) == 1.0


def test_fit_writes_run_dir_and_learns(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    # weight decay only on matrices; every trainable tensor in exactly one group
    t = Trainer(model, CopyStage(), cfg(max_steps=12, eval_interval=6, ckpt_interval=6), tmp_path / "run")
    decay, no_decay = t.optimizer.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    out = t.fit()
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    assert len(train) == 12 and train[-1] < train[0] - 0.3
    assert [r["step"] for r in evals] == [6, 12]
    assert out["val_ppl"] == pytest.approx(math.exp(out["val_loss"]))
    assert (run / "loss.png").stat().st_size > 1000 and (run / "run_config.toml").exists()
    for d in ("ckpt", "best"):
        loaded = load_model(run / d)
        assert loaded.config == model.config
    torch.testing.assert_close(load_model(run / "ckpt").state_dict(), model.state_dict(), rtol=0, atol=0)
    state = json.loads((run / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["stage_state"] == {"calls": 12}


def test_resume_in_process_is_exact(tmp_path):
    torch.manual_seed(0)
    straight = GPT(tiny_config(dropout=0.1))  # dropout: the RNG state must be restored too
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    Trainer(straight, CopyStage(), cfg(max_steps=8, ckpt_interval=4), tmp_path / "a").fit()

    first = GPT(tiny_config(dropout=0.1))
    first.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after step 4: checkpoint, stop
        Trainer(first, CopyStage(interrupt_at=4), cfg(max_steps=8, ckpt_interval=4), tmp_path / "b").fit()
    second = GPT(tiny_config(dropout=0.1))  # a fresh process would build a fresh model
    stage = CopyStage()
    Trainer(second, stage, cfg(max_steps=8, ckpt_interval=4), tmp_path / "b").fit()
    assert stage.calls == 8  # stage state restored
    torch.testing.assert_close(second.state_dict(), straight.state_dict(), rtol=0, atol=0)
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in x]
    assert losses("a") == losses("b")


def test_muon_trains_hidden_matrices_learns_and_resumes_exactly(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GPT(tiny_config(tie_embeddings=False))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    t = Trainer(model, CopyStage(), cfg(max_steps=8, ckpt_interval=4, optimizer="muon"), tmp_path / "a")
    muon, adamw = t.optimizer.opts
    names = {p: n for n, p in model.named_parameters()}
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sorted(names[p] for g in muon.param_groups for p in g["params"]) == sorted(
        n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h."))  # the blocks' matrices
    assert {names[p] for p in adamw.param_groups[0]["params"]} == {"wte.weight", "wpe.weight", "lm_head.weight"}
    t.fit()
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in x]
    assert losses("a")[-1] < losses("a")[0] - 0.5
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[2])["lr"] > 0

    first = GPT(tiny_config(tie_embeddings=False))  # Ctrl-C after step 4, then the same run again: bitwise equal
    first.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, CopyStage(interrupt_at=4), cfg(max_steps=8, ckpt_interval=4, optimizer="muon"),
                tmp_path / "b").fit()
    second = GPT(tiny_config(tie_embeddings=False))
    resumed = Trainer(second, CopyStage(), cfg(max_steps=8, ckpt_interval=4, optimizer="muon"), tmp_path / "b")
    resumed.fit()
    torch.testing.assert_close(second.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert losses("b") == losses("a")
    torch.testing.assert_close(resumed.optimizer.state_dict()["state"], t.optimizer.state_dict()["state"],
                               rtol=0, atol=0)

    monkeypatch.delattr(torch.optim, "Muon")  # an older torch: one line saying what to do
    with pytest.raises(UserError, match="no torch.optim.Muon; upgrade torch .* or use optimizer = 'adamw'"):
        Trainer(GPT(tiny_config()), CopyStage(), cfg(optimizer="muon"), tmp_path / "c")


class BufferStage(CopyStage):
    """Keeps a tensor (like a rollout buffer) that each step's end redraws and the next batches use: resume is
    exact only if the trainer saves and restores it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.buf = torch.zeros(self.B, dtype=torch.long)
        self.restored: list[str] = []

    def get_batch(self, step, micro):
        x, y = super().get_batch(step, micro)
        return (x + self.buf[:, None]) % 23, (y + self.buf[:, None]) % 23

    def on_step_end(self, step, model, metrics):
        self.buf = torch.randint(0, 23, (self.B,))
        super().on_step_end(step, model, metrics)

    def state_tensors(self):
        return {"buf": self.buf}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.restored.append("json")

    def load_state_tensors(self, tensors):
        self.buf = tensors["buf"]
        self.restored.append("tensors")


def test_stage_tensors_are_checkpointed_and_restored_after_the_json_state(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    straight = GPT(tiny_config())
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    Trainer(straight, BufferStage(), cfg(max_steps=8, ckpt_interval=4), tmp_path / "a").fit()

    first = GPT(tiny_config())
    first.load_state_dict(init)
    stopped = BufferStage(interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, stopped, cfg(max_steps=8, ckpt_interval=4), tmp_path / "b").fit()
    saved = load_file(str(tmp_path / "b" / "ckpt" / "stage.safetensors"))
    assert saved.keys() == {"rank0.buf"} and torch.equal(saved["rank0.buf"], stopped.buf)
    assert stopped.buf.any()  # a redrawn buffer, not its initial zeros

    second, stage = GPT(tiny_config()), BufferStage()
    Trainer(second, stage, cfg(max_steps=8, ckpt_interval=4), tmp_path / "b").fit()
    assert stage.restored == ["json", "tensors"]
    torch.testing.assert_close(second.state_dict(), straight.state_dict(), rtol=0, atol=0)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    boom = {"on": False}

    def save_model(m, d):
        write_model(m, d)
        if boom["on"]:
            (d / "model.safetensors").write_bytes(b"half")  # a write cut half-way
            raise OSError("disk full")

    t = Trainer(model, CopyStage(), cfg(max_steps=3), tmp_path / "run", save_model=save_model)
    t.fit()
    ckpt = tmp_path / "run" / "ckpt"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    t.step = 99
    boom["on"] = True
    with pytest.raises(OSError):
        t.save_checkpoint()
    after = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    assert after == before
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".ckpt")]  # no temp dirs left
    load_model(ckpt)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    t = Trainer(model, CopyStage(nan_at=5), cfg(max_steps=10, ckpt_interval=2, eval_interval=0), tmp_path / "r")
    with pytest.raises(TrainingDiverged) as e:
        t.fit()
    msg = str(e.value)
    assert "step 5" in msg and "not finite" in msg and "step 4" in msg and "\n" not in msg
    assert isinstance(e.value, UserError)
    state = json.loads((tmp_path / "r" / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "r" / "ckpt").parameters())


def test_sigint_saves_checkpoint_then_stops(tmp_path):
    torch.manual_seed(0)
    t = Trainer(GPT(tiny_config()), CopyStage(interrupt_at=2), cfg(max_steps=50, ckpt_interval=0, eval_interval=0),
                tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    state = json.loads((tmp_path / "r" / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_grad_accum_equals_big_batch(tmp_path):
    """2 micro-batches of 4 == one batch of 8 (same windows), to float tolerance."""

    class Split(CopyStage):
        def __init__(self, B, accum):
            super().__init__(B=B)
            self.accum = accum

        def get_batch(self, step, micro):
            x, y = CopyStage.get_batch(self, step, 0)  # the same 8 windows either way
            if self.accum == 1:
                return x, y
            return x[micro * 4 : (micro + 1) * 4], y[micro * 4 : (micro + 1) * 4]

    torch.manual_seed(0)
    a = GPT(tiny_config())
    b = GPT(tiny_config())
    b.load_state_dict(a.state_dict())
    Trainer(a, Split(8, 1), cfg(max_steps=3, batch_size=8), tmp_path / "a").fit()
    Trainer(b, Split(8, 2), cfg(max_steps=3, batch_size=4, grad_accum=2), tmp_path / "b").fit()
    torch.testing.assert_close(a.state_dict(), b.state_dict(), atol=1e-5, rtol=1e-4)


# ---- config ----------------------------------------------------------------------------------------------------------


def test_config_unknown_key_names_file_line_and_suggestion(tmp_path):
    from pocketgpt.model import GPTConfig

    p = tmp_path / "c.toml"
    p.write_text("[model]\nn_layer = 2\n\n[train]\nmax_steps = 5\nlrr = 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(p, None, {"model": GPTConfig, "train": TrainConfig})
    assert f"{p}:6" in str(e.value) and "[train]" in str(e.value) and "'lr'" in str(e.value)
    p.write_text("[modle]\nn_layer = 2\n")
    with pytest.raises(UserError, match="did you mean 'model'"):
        load_config(p, None, {"model": GPTConfig, "train": TrainConfig})
    p.write_text("[train]\nmax_steps = 'ten'\n")
    with pytest.raises(UserError, match=r"c.toml:2: \[train\] max_steps: expected int"):
        load_config(p, None, {"train": TrainConfig})


def test_config_overrides_coerce_and_bare_keys_set_every_section(tmp_path):
    from pocketgpt.model import GPTConfig
    from pocketgpt.train.pretrain import DataConfig

    p = tmp_path / "c.toml"
    p.write_text("[model]\nn_embd = 64\nn_head = 2\n[train]\nmax_steps = 5\n")
    secs = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}
    c = load_config(p, ["--lr", "1e-3", "--block_size=48", "--train.compile", "--model.n_embd", "96",
                        "--data.block_size", "none"], secs)
    assert c["train"].lr == 1e-3 and c["train"].compile is True and c["train"].max_steps == 5
    assert c["model"].block_size == 48 and c["data"].block_size is None
    assert c["model"].n_embd == 96 and c["model"].mlp_hidden == 4 * 96  # __post_init__ saw the override
    with pytest.raises(UserError, match="did you mean 'max_steps'"):
        load_config(p, ["--max_step", "3"], secs)
    with pytest.raises(UserError, match="--lr: expected float"):
        load_config(p, ["--lr", "fast"], secs)
    # the config as used round-trips through run_config.toml
    q = tmp_path / "used.toml"
    q.write_text(dump_toml(c.to_dict()))
    again = load_config(q, None, secs)
    assert again.to_dict() == c.to_dict()


# ---- time budget -------------------------------------------------------------------------------------------------------


class FakeClock:
    """Stands in for the trainer's ``time`` module: only the stage moves it (``TimedStage``)."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


class TimedStage(CopyStage):
    """Every batch takes ``seconds`` on the fake clock."""

    def __init__(self, clock, seconds=1.0, **kw):
        super().__init__(**kw)
        self.clock, self.seconds = clock, seconds

    def get_batch(self, step, micro):
        self.clock.now += self.seconds
        return super().get_batch(step, micro)


def test_time_budget_sizes_the_whole_schedule_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """1 s a step, a 1-minute budget: after 1 + MEASURED_STEPS steps (6 s) 54 more fit, so 60 of max_steps 1000,
    warm-up 100 → 6 (in proportion); the lr reaches its end at step 60, and a resumed run keeps the decision."""
    from pocketgpt.train import trainer as trainer_mod

    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "time", clock)
    c = cfg(max_steps=1000, warmup_steps=100, max_minutes=1.0, eval_interval=0, ckpt_interval=10)
    torch.manual_seed(0)
    straight = GPT(tiny_config())
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    out = Trainer(straight, TimedStage(clock), c, tmp_path / "a").fit()
    assert out["step"] == 60
    assert "time budget 1 min at 1 s/step: the run will take 60 steps (warm-up 6; max_steps 1000 do not fit)" \
        in capsys.readouterr().err
    state = json.loads((tmp_path / "a" / "ckpt" / "trainer_state.json").read_text())
    assert state["schedule"] == {"max_steps": 60, "warmup_steps": 6, "eval_interval": 0, "ckpt_interval": 10,
                                 "for": [1000, 1.0]}
    recs = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    sized = c.model_copy(update={"max_steps": 60, "warmup_steps": 6})  # the measured steps ran on the configured warm-up
    lrs = [r["lr"] for r in recs("a") if "lr" in r]
    assert lrs == [lr_at(c, s) for s in range(6)] + [lr_at(sized, s) for s in range(6, 60)]
    assert lrs[-1] == pytest.approx(c.min_lr, rel=0.01)  # the decay ended with the budget

    first = GPT(tiny_config())
    first.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after step 30: the decision is in the checkpoint
        Trainer(first, TimedStage(clock, interrupt_at=30), c, tmp_path / "b").fit()
    capsys.readouterr()
    second = GPT(tiny_config())
    assert Trainer(second, TimedStage(clock), c, tmp_path / "b").fit()["step"] == 60
    assert "time budget" not in capsys.readouterr().err  # not measured again
    steps = lambda d: [(r["step"], r["loss"], r["lr"]) for r in recs(d) if "loss" in r]
    assert steps("b") == steps("a")  # (the interrupted run also evaluated at step 30)
    torch.testing.assert_close(second.state_dict(), straight.state_dict(), rtol=0, atol=0)


def test_time_budget_that_fits_max_steps_says_so(tmp_path, monkeypatch, capsys):
    from pocketgpt.train import trainer as trainer_mod

    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "time", clock)
    c = cfg(max_steps=12, warmup_steps=4, max_minutes=1.0, eval_interval=0, ckpt_interval=0)
    assert Trainer(GPT(tiny_config()), TimedStage(clock), c, tmp_path / "r").fit()["step"] == 12
    assert "the run will take 12 steps (max_steps)" in capsys.readouterr().err


def test_time_budget_spaces_evaluations_and_checkpoints_to_a_small_share(tmp_path, monkeypatch, capsys):
    """1 s a step, 2 s an evaluation, 10 minutes: the evaluation timed at sizing says 11 more fit in 4% of the budget
    (24 s), so they come every ceil(576 / 11) = 53 steps, each with the only checkpoints, and the whole run fits."""
    from pocketgpt.train import trainer as trainer_mod

    class SlowEval(TimedStage):
        def evaluate(self, model):  # 1 s more than its batch
            self.clock.now += 1.0
            return super().evaluate(model)

    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "time", clock)
    saved = []
    save = trainer_mod.Trainer.save_checkpoint
    monkeypatch.setattr(trainer_mod.Trainer, "save_checkpoint", lambda self: (saved.append(self.step), save(self)))
    start = clock.now
    c = cfg(max_steps=10_000, warmup_steps=10, max_minutes=10.0, eval_interval=10, ckpt_interval=8, log_interval=0)
    out = Trainer(GPT(tiny_config()), SlowEval(clock), c, tmp_path / "r").fit()
    evals = [r["step"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert out["step"] == 576 and evals == [6, *range(53, 576, 53), 576] and saved == evals
    assert 2.0 * len(evals) <= trainer_mod.PAUSE_SHARE * 600 and clock.now - start <= 600
    err = capsys.readouterr().err
    assert "the run will take 576 steps (warm-up 1; max_steps 10000 do not fit), evaluating every 53 (2 s each)" in err
    assert "reached step 576, 36,864 tokens in " in err
