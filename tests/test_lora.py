"""LoRA (``--lora_r``) for sft, dpo and rm: only the adapters (and the reward head) train and hold optimizer state,
a LoRA checkpoint loads everywhere with its adapters folded in (the same logits as the adapter model), ``pocketgpt
merge`` writes the folded checkpoint, and a killed LoRA run resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketgpt import GPT, GPTConfig
from pocketgpt.checkpoint import load_model, read_model_config
from pocketgpt.cli import main
from pocketgpt.errors import UserError
from pocketgpt.lora import SUFFIXES, LoRALinear, apply
from pocketgpt.train.trainer import TrainConfig, Trainer, default_load_model
from test_resume import check_exact_resume, make_inputs, read_records, stage_argv

LORA = dict(lora_r=4, lr=3e-2, warmup_steps=0)  # adapters start at zero: a higher lr than full fine-tuning


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny inputs, with an output layer scaled like a trained one: at the init's std 0.02 the frozen lm_head
    caps every logit near ±1, and no adapter could lower the loss much."""
    from pocketgpt.checkpoint import save_model

    inp = make_inputs(tmp_path_factory.mktemp("inputs"), tie=False)
    model = load_model(inp["init"])
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    save_model(model, inp["init"])
    return inp


def run(stage, inp, out, *extra, **train):
    assert main([*map(str, stage_argv(stage, inp, **{**LORA, **train})), "--out", str(out), *map(str, extra)]) == 0
    return out / "ckpt"


def adapter_model(ckpt: Path, **train) -> GPT:
    """The model as it trained: base config + adapters, the checkpoint loaded by name (as a resume does)."""
    config, _ = read_model_config(ckpt)
    model = apply(GPT(config), TrainConfig(**{"lora_r": LORA["lora_r"], **train}))
    default_load_model(model, ckpt)
    return model.eval()


def optimizer_params(ckpt: Path) -> int:
    return len({k.split(".")[1] for k in load_file(str(ckpt / "optimizer.safetensors"))})


def test_r8_on_the_default_targets_trains_under_2_percent_of_gpt2_124m():
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)  # GPT-2 124M
    with torch.device("meta"):
        model = GPT(config, init_weights=False)
        plain = set(model.state_dict())
        apply(model, TrainConfig(lora_r=8))
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 4 * config.n_layer  # attention qkv + out, MLP in + out, in every block
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    n = sum(p.numel() for p in trainable.values())
    assert n == sum(8 * (m.in_features + m.out_features) for m in adapted)
    assert n / model.num_params() <= 0.02
    extra = set(model.state_dict()) - plain  # the base weights keep their names: plain checkpoints still match
    assert plain <= set(model.state_dict()) and all(k.endswith(SUFFIXES) for k in extra)


@pytest.fixture(scope="module")
def sft_ckpt(inputs, tmp_path_factory):
    return run("sft", inputs, tmp_path_factory.mktemp("sft") / "run", max_steps=24, eval_interval=0)


def test_lora_sft_loss_falls_and_only_adapters_train(sft_ckpt, inputs):
    losses = [r["loss"] for r in read_records(sft_ckpt.parent) if "loss" in r]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    saved, init = load_file(str(sft_ckpt / "model.safetensors")), load_file(str(inputs["init"] / "model.safetensors"))
    assert all(torch.equal(saved[k], init[k]) for k in init)  # the base weights are frozen
    lora_b = [v for k, v in saved.items() if k.endswith(".lora_B")]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)
    assert optimizer_params(sft_ckpt) == 2 * len(lora_b)  # A and B of each adapted layer, nothing else


def test_a_lora_checkpoint_loads_folded_everywhere(sft_ckpt, inputs, tmp_path):
    x = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapter_model(sft_ckpt)(x)[0]
        folded = load_model(sft_ckpt)
        assert not any(isinstance(m, LoRALinear) for m in folded.modules())
        assert (folded(x)[0] - want).abs().max() <= 1e-5
        assert (load_model(inputs["init"])(x)[0] - want).abs().max() > 1e-2  # the adapters changed the model

        assert main(["merge", str(sft_ckpt), str(tmp_path / "merged")]) == 0
        merged = tmp_path / "merged"
        assert not any(k.endswith(SUFFIXES) for k in load_file(str(merged / "model.safetensors")))
        assert (merged / "tokenizer").is_dir() and not (merged / "optimizer.safetensors").exists()
        assert (load_model(merged)(x)[0] - want).abs().max() <= 1e-5

        assert main(["export", str(sft_ckpt), str(tmp_path / "hf")]) == 0  # every export folds them in
        assert (load_model(tmp_path / "hf")(x)[0] - want).abs().max() <= 1e-5
    assert main(["sample", "--ckpt", str(sft_ckpt), "--max-new-tokens", "4", "--temperature", "0"]) == 0


@pytest.mark.parametrize("stage", ["sft", "rm"])  # the trainer's own save/load, and the reward model's
def test_lora_runs_resume_exactly(stage, inputs, tmp_path):
    check_exact_resume(stage_argv(stage, inputs, **LORA), tmp_path)


def test_lora_dpo_runs_on_a_lora_sft_checkpoint_against_the_base_without_a_copy(sft_ckpt, inputs, tmp_path):
    inp = {**inputs, "init": sft_ckpt}  # the next stage's --init folds the SFT adapters, then adds its own
    records = {ref: read_records(run("dpo", inp, tmp_path / ref, "--reference", ref, max_steps=6).parent)
               for ref in ("precomputed", "online")}
    # the online reference is the same weights with the adapters off: the losses of the cached base scores
    pre, onl = ([r for r in records[k] if "loss" in r or "val_loss" in r] for k in ("precomputed", "online"))
    assert len(pre) == len(onl) and all(abs(a.get("loss", a.get("val_loss")) - b.get("loss", b.get("val_loss")))
                                        <= 1e-5 for a, b in zip(pre, onl))
    train = [r for r in records["online"] if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    assert train[-1]["loss"] < math.log(2) - 0.01  # the adapters learn while the reference stays the base
    ckpt = tmp_path / "online" / "ckpt"
    saved, init = load_file(str(ckpt / "model.safetensors")), load_model(sft_ckpt).state_dict()
    assert all(torch.equal(saved[k], init[k]) for k in saved if not k.endswith(SUFFIXES))


def test_lora_reward_model_trains_adapters_and_head(inputs, tmp_path):
    from pocketgpt.train.reward import RewardModel, _load_rm, load_reward_model

    ckpt = run("rm", inputs, tmp_path / "rm", max_steps=6)
    assert optimizer_params(ckpt) == 8 + 2  # 4 adapters (A, B) + the head (weight, bias)
    config, _ = read_model_config(ckpt)
    trained = RewardModel(apply(GPT(config), TrainConfig(lora_r=LORA["lora_r"])))
    _load_rm(trained, ckpt)
    fresh = RewardModel(load_model(inputs["init"]), seed=1337)
    assert not torch.equal(trained.head.weight, fresh.head.weight)  # the head trained
    rows = [[1, 5, 9, 12, 3], [2, 7, 7]]
    assert load_reward_model(ckpt).score_ids(rows) == pytest.approx(trained.eval().score_ids(rows), abs=1e-5)


def test_lora_errors_are_one_line(inputs, tmp_path, capsys):
    argv = [*map(str, stage_argv("sft", inputs, lora_r=4, max_steps=1)), "--out", str(tmp_path / "x")]
    assert main([*argv, "--lora_targets", "q_proj"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("pocketgpt sft: error: --lora_targets: ")
    assert "'q_proj'" in last and "c_attn" in last  # names the target and the layers there are
    tied = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(UserError, match="tie_embeddings"):
        apply(tied, TrainConfig(lora_r=4, lora_targets=["lm_head"]))

    class Pretrain:
        name = "pretrain"

    with pytest.raises(UserError, match="sft, dpo and rm"):  # a stage that never applies them refuses lora_r
        Trainer(tied, Pretrain(), TrainConfig(lora_r=4, device="cpu"), tmp_path / "p")


def test_lora_sft_from_gpt2_trains_the_chat_tokens_it_adds(inputs, tmp_path):
    """A GPT-2 vocabulary lacks the chat tokens: SFT appends them with one shared mean-embedding start, so under
    LoRA their rows train too (else <|user|>, <|assistant|> and <|end|> stay one token)."""
    from pocketgpt.checkpoint import export_hf, save_model
    from pocketgpt.tokenizer import SPECIAL_TOKENS, _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=len(vocab), block_size=48, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        base.wte.weight.mul_(10)  # tied: an output layer scaled like a trained one (see the inputs fixture)
    export_hf(base, tmp_path / "gpt2", "gpt2")
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "gpt2" / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    ckpt = run("sft", {**inputs, "init": tmp_path / "gpt2"}, tmp_path / "run", max_steps=8)
    saved = load_file(str(ckpt / "model.safetensors"))
    rows = saved["wte.lora_rows"]  # one tied table: the input and output rows of the 5 new tokens
    assert rows.shape == (len(SPECIAL_TOKENS) - 1, 32) and int(saved["wte.lora_first"]) == len(vocab)
    assert not torch.equal(rows[3], rows[4])  # <|assistant|> and <|end|> have become different tokens
    assert torch.equal(saved["wte.weight"][: len(vocab)], base.wte.weight)  # the old rows stay frozen
    assert optimizer_params(ckpt) == 8 + 1
    x = torch.tensor([[len(vocab), 5, 7, len(vocab) + 4, 9, len(vocab) + 3]])
    config, _ = read_model_config(ckpt)
    model = apply(GPT(config), TrainConfig(lora_r=LORA["lora_r"]), new_tokens=range(len(vocab), len(vocab) + 5))
    default_load_model(model, ckpt)
    with torch.no_grad():
        assert (load_model(ckpt)(x)[0] - model.eval()(x)[0]).abs().max() <= 1e-5


def test_unmerged_adapters_decode_through_the_forward_that_uses_them():
    """The CPU decode step reads base weights; a model with live adapters must not take it (its logits would lose
    the adapters)."""
    from pocketgpt.fastdecode import applies, step_fn

    torch.manual_seed(0)
    model = apply(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)),
                  TrainConfig(lora_r=4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.parameters():
                    if p.requires_grad:
                        p.normal_()
        assert not applies(model)
        tokens = torch.tensor([3, 5])
        full, _ = model(tokens[:, None])
        step = step_fn(model)(tokens, model.new_kv_cache(2))
    torch.testing.assert_close(step, full[:, -1])
