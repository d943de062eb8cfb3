"""Hugging Face export: the exported directory tokenizes, renders chats and generates exactly as pocketgpt does in
``transformers`` (every tokenizer kind, GPT-2 and Llama); logits match; ``--init hf:NAME`` resolves through the
Hugging Face cache and fails in one line when the model is not there (no network: ``HF_HUB_OFFLINE=1``)."""

import json
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli, tiny_config
from pocketgpt import GPT, GPTConfig, Tokenizer, load_model, save_model
from pocketgpt.chat import render
from pocketgpt.checkpoint import export_hf
from pocketgpt.data import builtin_path, read_text_file
from pocketgpt.engine import generate

TEXTS = ["ROMEO:\nWhat, ho! Who is there?", "你好，世界！《水浒传》第一回。",
         "  runs   of spaces,\ttabs\t\tand\n\n\nnewlines \r\n end  ", " leading space", "\n"]
CHATS = {
    "english": [{"role": "user", "content": "ROMEO:\nWhat, ho! Who is there?"}],
    "chinese": [{"role": "user", "content": "你好，世界！"}, {"role": "assistant", "content": "《水浒传》第一回。"},
                {"role": "user", "content": "第一回"}],
    "system": [{"role": "system", "content": "  be  brief\t"}, {"role": "user", "content": "\nWhat, ho!"},
               {"role": "assistant", "content": " Who is there?\n"}, {"role": "user", "content": "你好"}],
}
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-6)


@pytest.fixture(scope="module")
def tokenizers():
    # the corpus holds every test text, so that no kind needs <unk> and decoding gives the text back
    corpus = [read_text_file(builtin_path("shakespeare"))[:20_000], read_text_file(builtin_path("shuihu"))[:5_000],
              *TEXTS]
    with warnings.catch_warnings():  # the word vocabulary is every word of the corpus, fewer than asked
        warnings.simplefilter("ignore")
        word = Tokenizer.train("word", corpus, 8000)
    return {"bpe": Tokenizer.train("bpe", corpus, 600), "char": Tokenizer.train("char", corpus), "word": word,
            "unigram": Tokenizer.train("unigram", corpus, 2000)}


def _export(tmp_path, tok, arch, **model):
    kw = LLAMA if arch == "llama" else {}
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16, **{**kw, **model})
    gpt = GPT(cfg).eval()
    export_hf(gpt, tmp_path / arch, arch, tokenizer=tok)
    return gpt, tmp_path / arch


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char", "word"])
def test_exported_tokenizer_gives_our_ids_and_renders_our_chat(tmp_path, tokenizers, kind):
    tok = tokenizers[kind]
    for arch in ("gpt2", "llama"):  # a GPT-2 config once made transformers rebuild a GPT-2 byte-level tokenizer
        _, out = _export(tmp_path, tok, arch)
        hf = AutoTokenizer.from_pretrained(out)
        for text in TEXTS:
            ids = tok.encode(text)
            assert hf.encode(text, add_special_tokens=False) == ids, (arch, text)
            assert hf(text)["input_ids"] == ids  # nothing is added around a plain text either
            assert hf.decode(ids) == tok.decode(ids) == text
        for name, messages in CHATS.items():
            for prompt in (True, False):
                got = hf.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True)["input_ids"]
                assert got == render(messages, tok, add_generation_prompt=prompt)[0], (arch, name, prompt)
        sp = tok.special_ids
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (sp["<|endoftext|>"], sp["<|end|>"],
                                                                        sp["<|pad|>"])
        gen = json.loads((out / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [sp["<|end|>"], sp["<|endoftext|>"]] and gen["pad_token_id"] == sp["<|pad|>"]
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (sp["<|endoftext|>"], sp["<|end|>"])
        assert Tokenizer.load(out).fingerprint == tok.fingerprint  # and pocketgpt reads the export back


def _train_to_answer(gpt, tok, chats, steps=300):
    """Fit the replies (and their <|end|>) of ``chats`` so greedy decoding ends each reply with <|end|>."""
    torch.manual_seed(0)
    rows = [render(c, tok) for c in chats]
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    gpt.train()
    for _ in range(steps):
        loss = sum(gpt(torch.tensor([ids[:-1]]), torch.tensor([labels[1:]]))[1] for ids, labels in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    return gpt.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_generate_replies_as_pocketgpt_and_stops_at_end(tmp_path, tokenizers, arch):
    tok = tokenizers["char"]
    chats = [[{"role": "user", "content": "What, ho!"}, {"role": "assistant", "content": "Who is there?"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"},
              {"role": "assistant", "content": "世界！"}]]
    torch.manual_seed(0)
    kw = {**LLAMA, "n_kv_head": 2} if arch == "llama" else {}
    gpt = _train_to_answer(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                                         **kw)), tok, chats)
    export_hf(gpt, tmp_path / "hf", arch, tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    end, limit = tok.token_id("<|end|>"), 40
    for chat in chats:
        prompt = render(chat[:-1], tok, add_generation_prompt=True)[0]
        [ours] = generate(gpt, [prompt], temperature=0, max_new_tokens=limit, stop_ids=[end], tokenizer=tok)
        assert tok.decode(ours) == chat[-1]["content"]  # the model learned the reply and then said <|end|>
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False)
        # generation_config's eos ids stop transformers right after <|end|>, not at max_new_tokens
        assert out[0, len(prompt):].tolist() == ours + [end]
        assert hf_tok.decode(out[0, len(prompt):], skip_special_tokens=True) == chat[-1]["content"]


# ---------------------------------------------------------------------------------------------------------------------
# weights (moved here from test_model.py)


@pytest.mark.parametrize("bias", [True, False])
def test_export_gpt2_loads_in_transformers(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, bias=bias)).eval()
    for p in model.parameters():  # make biases and norms non-trivial
        p.data += 0.01 * torch.randn_like(p)
    save_model(model, tmp_path / "ours")
    run_cli("export", "--format", "hf", tmp_path / "ours", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_export_llama_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                    norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=tie, norm_eps=1e-6)
    model = GPT(cfg).eval()
    for p in model.parameters():
        p.data += 0.01 * torch.randn_like(p)
    save_model(model, tmp_path / "ours")
    run_cli("export", tmp_path / "ours", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        assert (ref - model(idx)[0]).abs().max().item() < 1e-4
        back = load_model(tmp_path / "hf")  # and a Llama directory loads back into pocketgpt
        assert (back(idx)[0] - ref).abs().max().item() < 1e-4


def test_unexportable_combination_names_the_option(tmp_path):
    model = GPT(tiny_config(pos="sinusoidal"))
    save_model(model, tmp_path / "m")
    p = run_cli("export", tmp_path / "m", tmp_path / "out", check=False)
    assert p.returncode == 2 and "pos='sinusoidal'" in p.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --init hf:NAME


def _hub_cache(tmp_path, name, source):
    """A Hugging Face cache (``HF_HUB_CACHE`` layout) holding ``source``'s files as the snapshot of hub id ``name``."""
    repo = tmp_path / "hub" / ("models--" + name.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return tmp_path / "hub"


def test_init_hf_name_uses_the_cache_and_offline_misses_fail_in_one_line(tmp_path, tokenizers, monkeypatch, capsys):
    import huggingface_hub

    from pocketgpt.cli import main
    from test_sft import make_pairs, write_conversations

    tok = tokenizers["char"]
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    export_hf(gpt, tmp_path / "export", "gpt2", tokenizer=tok)
    cache = _hub_cache(tmp_path, "someone/tiny-gpt2", tmp_path / "export")
    # what HF_HUB_OFFLINE=1 HF_HUB_CACHE=... set when huggingface_hub is imported (already done in this process)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    data = write_conversations(tmp_path / "qa.jsonl", make_pairs(4, 0))
    argv = [f"--{k}={v}" for k, v in dict(data=data, max_steps=1, batch_size=2, eval_interval=0, device="cpu",
                                          dtype="fp32", progress="false").items()] + ["--sft.val_fraction=0"]
    assert main(["sft", "--init", "hf:someone/tiny-gpt2", "--out", str(tmp_path / "run"), *argv]) == 0
    tuned = load_model(tmp_path / "run" / "ckpt")
    assert tuned.config.vocab_size == gpt.config.vocab_size
    assert Tokenizer.load(tmp_path / "run" / "ckpt" / "tokenizer").encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert main(["sft", "--init", str(tmp_path / "export"), "--out", str(tmp_path / "run2"), *argv]) == 0  # local
    capsys.readouterr()
    assert main(["sft", "--init", "hf:nobody/missing", "--out", str(tmp_path / "run3"), *argv]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "hf:nobody/missing" in line and "huggingface-cli download nobody/missing" in line, line

    # the same through the environment variables a user sets, in a fresh process
    p = run_cli("export", "hf:nobody/missing", tmp_path / "out", check=False,
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("pocketgpt export: error: hf:nobody/missing: ") and "huggingface-cli download" in line
