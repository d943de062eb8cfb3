"""The GPT itself: shapes that matter, KV cache, save/load, Hugging Face parity both ways, errors, learning."""

import json

import pytest
import torch
import transformers
from pydantic import ValidationError

from conftest import run_cli, tiny_config
from pocketgpt import GPT, GPTConfig, UserError, checkpoint
from pocketgpt.checkpoint import load_model, save_model

ALL_KINDS = [
    dict(pos="learned", norm="layernorm", mlp="gelu"),
    dict(pos="sinusoidal", norm="layernorm", mlp="relu", bias=False),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    dict(pos="rope", norm="layernorm", mlp="gelu", tie_embeddings=False),
]


@pytest.mark.parametrize("kw", ALL_KINDS, ids=lambda k: f"{k['pos']}-{k['norm']}-{k['mlp']}")
def test_kv_cache_matches_full_forward(kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw)).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2)
        prefix, _ = model(idx[:, :7], kv_cache=cache)
        chunks = [prefix]
        chunk, _ = model(idx[:, 7:10], kv_cache=cache)  # several tokens after a cached prefix
        chunks.append(chunk)
        for t in range(10, 20):
            step, _ = model(idx[:, t : t + 1], kv_cache=cache)
            chunks.append(step)
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-4)


def test_left_padded_positions_match_unpadded():
    torch.manual_seed(0)
    model = GPT(tiny_config(pos="rope", norm="rmsnorm", mlp="swiglu")).eval()
    seq = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mask[:, :3] = False
    mask[:3, :3] = torch.eye(3, dtype=torch.bool)  # pad rows attend to themselves only (no NaN)
    with torch.no_grad():
        a, _ = model(seq)
        b, _ = model(padded, position_ids=pos, attn_mask=mask[None, None])
    torch.testing.assert_close(b[:, 3:], a, atol=1e-5, rtol=1e-4)


def test_loss_ignores_minus_100():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (2, 8))
    tgt = idx.clone()
    tgt[:, :4] = -100
    logits, loss = model(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_param_count_and_flops_match_independent_counts():
    # GPT-2 small has 124,439,808 parameters (transformers' count for "gpt2"); 1024 x 768 of them are positions
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig(vocab_size=50257))
    assert gpt2.num_params() == 124_439_808 and gpt2.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    # FLOPs: torch's FlopCounterMode counts the matmuls of a real forward + backward (math attention kernel, so the
    # full T x T attention products are counted, as the estimate does); the estimate's 6 per parameter also covers
    # the parameters no matmul uses (biases, norms), added here from the model's 1-D tensors
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for kw, T in ((dict(), 32), (dict(), 16), (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False), 24)):
        model = GPT(tiny_config(**kw))
        idx = torch.randint(0, 97, (2, T))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(idx, idx)[1].backward()
        vector_params = sum(p.numel() for p in model.parameters() if p.ndim == 1)
        assert counter.get_total_flops() / (2 * T) + 6 * vector_params == model.flops_per_token(T), (kw, T)


def test_mfu_peak_is_known_or_absent(monkeypatch):
    """MFU is reported only against a known peak: the environment's, or a CUDA GPU's data sheet, never a CPU guess."""
    from pocketgpt.runtime import peak_flops

    monkeypatch.delenv("POCKETGPT_PEAK_FLOPS", raising=False)
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == 756e12
    assert peak_flops(torch.device("cuda", 0), torch.float32) == 51e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) is None
    monkeypatch.setenv("POCKETGPT_PEAK_FLOPS", "2.5e12")
    assert peak_flops(torch.device("cpu"), torch.float32) == 2.5e12


def test_save_load_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    for i, kw in enumerate(ALL_KINDS):
        model = GPT(tiny_config(**kw))
        save_model(model, tmp_path / f"m{i}")
        loaded = load_model(tmp_path / f"m{i}")
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2), k1
        assert loaded.config == model.config
        if kw.get("tie_embeddings", True):
            assert loaded.lm_head.weight is loaded.wte.weight


def test_loading_a_checkpoint_stays_off_the_compiler_stack(tmp_path):
    """Building the empty model on the meta device must not run meta ``normal_``/``empty_like``: their first calls
    import sympy and torch's shape machinery (~2.5 s added to every ``sample``/``chat``/``serve`` start)."""
    import subprocess
    import sys

    save_model(GPT(tiny_config()), tmp_path / "m")
    code = ("import sys; from pocketgpt import load_model; m = load_model(sys.argv[1]); "
            "assert all(p.device.type == 'cpu' for p in m.parameters()); "
            "print('sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_truncated_and_missing_checkpoint_errors(tmp_path):
    model = GPT(tiny_config())
    save_model(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors: corrupt or truncated"):
        load_model(tmp_path / "m")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")
    p = run_cli("export", tmp_path / "m", tmp_path / "out", check=False)
    assert p.returncode == 2
    assert "corrupt or truncated" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_bad_config_errors(tmp_path):
    with pytest.raises(UserError, match=r"^c.json: \[model\] n_embd: .*divisible by n_head"):
        GPTConfig.from_dict({"n_embd": 30, "n_head": 4}, "c.json")
    with pytest.raises(UserError, match=r"\[model\] pos: must be one of 'learned', 'sinusoidal' or 'rope', got 'alibi'"):
        GPTConfig.from_dict({"pos": "alibi"})
    with pytest.raises(ValidationError):  # built in code: pydantic's own error
        GPTConfig(n_layer=0)
    model = GPT(tiny_config())
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config.json: unknown model field 'n_layers' \(did you mean 'n_layer'\?\)"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json:1: invalid JSON"):
        load_model(tmp_path / "m")


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    model = GPT(tiny_config())
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)  # the weights' write fails halfway through a save
    with pytest.raises(RuntimeError):
        save_model(GPT(tiny_config(n_layer=1)), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=16))
    idx = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face parity


def test_hf_gpt2_import_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    idx = torch.randint(0, 1000, (2, 50))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert (got - ref).abs().max().item() < 1e-4


def test_hf_gpt2_pytorch_bin_import(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    (tmp_path / "hf").mkdir()
    cfg.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ours = load_model(tmp_path / "hf")
    idx = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
