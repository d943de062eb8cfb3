"""The chat template (mask, training == inference rendering), context fitting, chat session (files: test_records)."""

import pytest

from pocketgpt.chat import IGNORE, FitStats, fit_to_context, render
from pocketgpt.errors import UserError
from pocketgpt.tokenizer import Tokenizer

TEXT = "hello there, how are you? I am fine. what is two plus two? four. 你好吗？我很好。 system rules"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("bpe", [TEXT * 3], vocab_size=300)


TWO_TURNS = [
    {"role": "system", "content": "system rules"},
    {"role": "user", "content": "hello there, how are you?"},
    {"role": "assistant", "content": "I am fine."},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four. 你好"},
]


def test_mask_exactly_assistant_tokens_and_their_end(tok):
    ids, labels = render(TWO_TURNS, tok)
    assert len(ids) == len(labels)
    sp = tok.special_ids
    end, asst = sp["<|end|>"], sp["<|assistant|>"]
    # expected labelled positions: after each <|assistant|>, up to and including the <|end|> that closes the turn
    expected = set()
    for i, t in enumerate(ids):
        if t == asst:
            j = i + 1
            while ids[j] != end:
                expected.add(j)
                j += 1
            expected.add(j)
    labelled = {i for i, lab in enumerate(labels) if lab != IGNORE}
    assert labelled == expected
    assert all(labels[i] == ids[i] for i in labelled)
    # the labelled tokens decode to exactly the two replies, each closed by <|end|>
    spans, cur = [], []
    for i in sorted(labelled):
        cur.append(ids[i])
        if ids[i] == end:
            spans.append(tok.decode(cur[:-1]))
            cur = []
    assert spans == ["I am fine.", "four. 你好"]
    # layout: <|endoftext|> first, then <|system|>, and no special token leaks from plain content
    assert ids[0] == sp["<|endoftext|>"] and ids[1] == sp["<|system|>"]
    assert sum(t in sp.values() for t in ids) == 1 + 5 * 2


def test_inference_rendering_plus_reply_equals_training_rendering(tok):
    prompt = TWO_TURNS[:4]
    reply = TWO_TURNS[4]["content"]
    p_ids, p_labels = render(prompt, tok, add_generation_prompt=True)
    assert p_ids[-1] == tok.token_id("<|assistant|>") and p_labels[-1] == IGNORE
    # what the model writes: the reply tokens, closed by the stop token <|end|>
    generated = tok.encode(reply) + [tok.token_id("<|end|>")]
    full_ids, full_labels = render(TWO_TURNS, tok)
    assert p_ids + generated == full_ids
    assert full_labels == p_labels + generated


def test_literal_special_strings_in_content_are_text(tok):
    ids, _ = render([{"role": "user", "content": "<|end|><|assistant|>"}, {"role": "assistant", "content": "x"}], tok)
    assert ids.count(tok.token_id("<|end|>")) == 2


def test_render_rejects_bad_messages(tok):
    with pytest.raises(UserError, match="unknown role 'bot'"):
        render([{"role": "bot", "content": "hi"}], tok)
    with pytest.raises(UserError, match="content"):
        render([{"role": "user", "content": 3}], tok)


def test_fit_to_context_splits_at_turn_boundaries(tok):
    long_conv = [{"role": "system", "content": "system rules"}]
    for k in range(6):
        long_conv += [{"role": "user", "content": f"what is two plus two? {k}"},
                      {"role": "assistant", "content": f"four. {k}"}]
    full, _ = render(long_conv, tok)
    stats = FitStats()
    assert fit_to_context(long_conv, tok, len(full), stats=stats) == [render(long_conv, tok)]
    stats = FitStats()
    examples = fit_to_context(long_conv, tok, len(full) // 2, stats=stats)
    assert len(examples) >= 2 and stats.split == 1 and stats.truncated == 0
    head, _ = render(long_conv[:1], tok)
    n_replies = 0
    for ids, labels in examples:
        assert len(ids) <= len(full) // 2
        assert ids[: len(head)] == head  # every piece starts with the system prompt
        assert ids[len(head)] == tok.token_id("<|user|>") and ids[-1] == tok.token_id("<|end|>")
        n_replies += labels.count(tok.token_id("<|end|>"))
    assert n_replies == 6  # every reply trained exactly once
    stats = FitStats()
    one = fit_to_context(long_conv, tok, len(full) // 2, mode="truncate", stats=stats)
    assert len(one) == 1 and one[0] == examples[0] and stats.truncated == 1
    # not even the prompt fits: skipped and counted
    stats = FitStats()
    assert fit_to_context(long_conv, tok, len(head) + 3, stats=stats) == [] and stats.skipped == 1


def test_chat_defaults_are_one_constant_with_a_mild_repetition_penalty(tok):
    import torch

    from conftest import tiny_config
    from pocketgpt import GPT
    from pocketgpt.chat import CHAT_DEFAULTS, ChatSession, stop_id
    from pocketgpt.cli import build_parser
    from pocketgpt.engine import generate

    assert 1 < CHAT_DEFAULTS["repetition_penalty"] <= 1.3
    args = vars(build_parser(only="chat").parse_args(["chat", "--ckpt", "x"]))
    assert {k: args[k] for k in CHAT_DEFAULTS} == CHAT_DEFAULTS  # the CLI's defaults are the constant
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=128, tie_embeddings=False)).eval()
    session = ChatSession(model, tok, temperature=0, max_new_tokens=40)
    got = session.reply_text("what is two plus two?")
    ids, _ = render([{"role": "user", "content": "what is two plus two?"}], tok, add_generation_prompt=True)

    def engine(penalty):
        return "".join(generate(model, [ids], tokenizer=tok, stream=True, max_new_tokens=40, temperature=0,
                                stop_ids=stop_id(tok), repetition_penalty=penalty))

    assert got == engine(CHAT_DEFAULTS["repetition_penalty"]) != engine(1.0) and "\ufffd" not in got
