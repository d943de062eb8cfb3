"""The HTTP server, driven by the real ``openai`` client and raw HTTP: chat, streaming, completions with log-probs
(checked against a direct forward pass), auth, error bodies, the queue and client disconnects.

Servers run in this process (a uvicorn thread on a free 127.0.0.1 port) over a tiny random model whose checkpoint
and tokenizer are written to a temp dir; one test starts ``pocketgpt serve`` as a subprocess, as a user would.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import tiny_config
from pocketgpt import GPT
from pocketgpt.checkpoint import save_model
from pocketgpt.chat import CHAT_DEFAULTS, render
from pocketgpt.engine import generate
from pocketgpt.serve import load_backend
from pocketgpt.serve.app import create_app
from pocketgpt.tokenizer import Tokenizer

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles. 你好，世界！今天天气很好，我们去公园散步吧。"
    "The quick brown fox jumps over the lazy dog. 宋江道：兄弟们，我们一起喝酒。 Hello there, how are you today?"
) * 4


def make_checkpoint(path: Path, block_size: int = 128, seed: int = 0) -> Path:
    """A tiny random GPT + a 300-token byte-level BPE tokenizer, saved as a checkpoint directory."""
    tok = Tokenizer.train("bpe", [TEXT], vocab_size=300)
    torch.manual_seed(seed)
    # untied: a random model with tied embeddings mostly repeats its last input token (<|assistant|>: an empty reply)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=block_size, tie_embeddings=False))
    save_model(model, path)
    tok.save(path / "tokenizer")
    return path


def never_stop(backend, delay: float = 0.0, only: list[int] | None = None):
    """Make the backend's model never pick a stop token (and optionally slow, or limited to the token ids
    ``only``), so replies run to max_tokens. A subclass with its own forward: the engine then calls it every step."""
    model = backend.model
    banned = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    banned[backend.stop_ids] = True
    if only is not None:
        banned[:] = True
        banned[only] = False

    class NeverStopGPT(GPT):
        def forward(self, *args, **kw):
            logits, loss = super().forward(*args, **kw)
            if delay:
                time.sleep(delay)
            if logits is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            return logits, loss

    model.__class__ = NeverStopGPT
    return backend


@contextmanager
def live_server(app):
    """Run ``app`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def backend(ckpt):
    return load_backend(ckpt, device="cpu")


@pytest.fixture(scope="module")
def base_url(backend):
    with live_server(create_app(backend, max_concurrency=2)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def direct_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward pass (independent of the engine)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    logp = torch.log_softmax(logits[0].float(), -1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


# --------------------------------------------------------------------------------------------------------------------
# the openai client


def test_models_and_health(client, base_url, backend):
    ids = [m.id for m in client.models.list()]
    assert ids == [backend.model_id] == ["tiny-chat"]
    h = httpx.get(base_url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-chat" and h["running"] == 0


def test_chat_completion_matches_engine(client, backend):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，今天天气怎么样？"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    prompt, _ = render(messages, backend.tokenizer, add_generation_prompt=True)
    # the server's default repetition penalty applies (a request leaves it out)
    (want,) = generate(backend.model, [prompt], max_new_tokens=12, temperature=0, tokenizer=backend.tokenizer,
                       stop_ids=backend.stop_ids, return_logprobs=True,
                       repetition_penalty=CHAT_DEFAULTS["repetition_penalty"])
    (plain,) = generate(backend.model, [prompt], max_new_tokens=12, temperature=0, tokenizer=backend.tokenizer,
                        stop_ids=backend.stop_ids, return_logprobs=True)
    off = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0,
                                         extra_body={"repetition_penalty": 1.0})
    assert off.choices[0].message.content == plain.text != want.text
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text  # greedy: the server returns exactly the engine's reply
    assert choice.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.total_tokens == len(prompt) + len(want.tokens)


def test_streamed_chat_joins_to_full_text(client, backend):
    never_stop_messages = [{"role": "user", "content": "Tell me about the sea of troubles."}]
    kw = dict(model="tiny-chat", messages=never_stop_messages, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert "".join(pieces) == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # exact token counts when streaming
    assert len({c.id for c in chunks}) == 1


def test_chat_logprobs(client, backend):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，今天天气怎么样？"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"repetition_penalty": 1})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    # the bytes join to the reply; a token holding part of a character is escaped, never U+FFFD
    assert b"".join(bytes(c.bytes) for c in content).decode() == r.choices[0].message.content
    assert all("\ufffd" not in c.token for c in content) and any("\\x" in c.token for c in content)
    # the reply's tokens (the engine's greedy reply: the same bytes) and their log-probs from a plain forward pass
    prompt, _ = render(messages, backend.tokenizer, add_generation_prompt=True)
    (gen,) = generate(backend.model, [prompt], max_new_tokens=5, temperature=0, tokenizer=backend.tokenizer,
                      stop_ids=backend.stop_ids)
    assert backend.tokenizer.decode_bytes(gen) == b"".join(bytes(c.bytes) for c in content)
    want = direct_logprobs(backend.model, prompt + gen)[len(prompt) - 1 :]
    assert [c.logprob for c in content] == pytest.approx(want, abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5)
               for c in content)


def test_raw_stream_ends_with_done(base_url):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_sampling_seed_n_and_stop(client):
    kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "Hello there"}], max_tokens=10,
              temperature=1.0, top_p=0.9, seed=123, n=3, presence_penalty=0.5, frequency_penalty=0.5)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible

    # a stop string cuts the reply exactly before it
    greedy = client.chat.completions.create(model="tiny-chat", messages=kw["messages"], max_tokens=30,
                                            temperature=0).choices[0].message.content
    assert len(greedy) >= 6
    stop = greedy[3:6]
    cut = client.chat.completions.create(model="tiny-chat", messages=kw["messages"], max_tokens=30,
                                         temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)] != greedy
    assert cut.finish_reason == "stop"


def test_completion_logprobs_match_forward_pass(client, backend):
    r = client.completions.create(model="tiny-chat", prompt="To be, or not", max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"repetition_penalty": 1})
    choice = r.choices[0]
    prompt = backend.tokenizer.encode("To be, or not")
    lp = choice.logprobs
    n = r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(prompt) and 1 <= n <= 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        assert chosen <= max(top.values()) + 1e-5  # greedy among the tokens that keep the text valid UTF-8
    # the generated tokens' log-probs are those of the model itself
    (gen,) = generate(backend.model, [prompt], max_new_tokens=6, temperature=0, stop_ids=backend.stop_ids,
                      tokenizer=backend.tokenizer)
    want = direct_logprobs(backend.model, prompt + gen)[len(prompt) - 1 :]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
def test_echo_max_tokens_0_scores_the_prompt(client, backend, as_ids):
    """The evaluation-harness call: the prompt's own log-likelihood, token by token."""
    text = "The quick brown fox jumps over the lazy dog. 你好，世界！"
    ids = backend.tokenizer.encode(text)
    r = client.completions.create(model="tiny-chat", prompt=ids if as_ids else text, max_tokens=0, echo=True,
                                  logprobs=0, temperature=0)
    choice = r.choices[0]
    assert choice.text == text
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:] == pytest.approx(direct_logprobs(backend.model, ids), abs=1e-4)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_special_tokens_are_never_text(ckpt):
    """A model that writes <|end|> mid-completion ends its text there; an echoed prompt shows no special token."""
    backend = load_backend(ckpt, device="cpu")
    tok = backend.tokenizer
    end, letter = tok.token_id("<|end|>"), tok.encode("a")[0]
    never_stop(backend, only=[letter, end])  # every step: "a" or <|end|>
    with live_server(create_app(backend, max_concurrency=1)) as url:
        for seed in range(4):
            r = httpx.post(url + "/v1/completions", json={"prompt": "To be", "max_tokens": 40, "stop": ["\n"],
                                                           "seed": seed}, timeout=30).json()["choices"][0]
            assert set(r["text"]) <= {"a"} and r["finish_reason"] == "stop", r
        ids = tok.encode("To be") + [end] + tok.encode(" or not")
        r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
                       timeout=30).json()["choices"][0]
        assert r["text"] == "To be or not" and "".join(r["logprobs"]["tokens"]) == r["text"]
        k = len(tok.encode("To be"))  # <|end|>: an empty token, the next one starts where it did
        assert r["logprobs"]["tokens"][k] == "" and r["logprobs"]["text_offset"][k: k + 2] == [len("To be")] * 2


def test_model_id_is_the_run_name(ckpt, tmp_path):
    import shutil

    shutil.copytree(ckpt, tmp_path / "runs" / "sft" / "ckpt")
    shutil.copytree(ckpt, tmp_path / "runs" / "speedrun" / "dpo" / "best")
    (tmp_path / "runs" / "speedrun" / "speedrun_state.json").write_text("{}")
    assert load_backend(tmp_path / "runs" / "sft", device="cpu").model_id == "sft"  # a run directory works too
    assert load_backend(tmp_path / "runs" / "sft" / "ckpt", device="cpu").model_id == "sft"
    assert load_backend(tmp_path / "runs" / "speedrun" / "dpo" / "best", device="cpu").model_id == "speedrun-dpo"
    assert load_backend(ckpt, device="cpu").model_id == "tiny-chat"
    assert load_backend(tmp_path / "runs" / "sft", device="cpu", model_name="mine").model_id == "mine"


def test_completion_batch_of_prompts(client):
    r = client.completions.create(model="tiny-chat", prompt=["Hello", "你好"], max_tokens=4, n=2, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------------------
# bad requests: the documented status + an OpenAI error body, and the server keeps serving


def _chat(**kw):
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


BAD = [
    ("malformed-json", b'{"model": "tiny-chat", "messages": [', 400, None, "invalid_json"),
    ("not-an-object", b"[1, 2, 3]", 400, None, "invalid_json"),
    ("unknown-model", _chat(model="gpt-9"), 404, "model", "model_not_found"),
    ("empty-messages", _chat(messages=[]), 400, "messages", "empty_messages"),
    ("missing-messages", {"model": "tiny-chat"}, 400, "messages", "invalid_value"),
    ("temperature-type", _chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("temperature-range", _chat(temperature=5), 400, "temperature", "invalid_value"),
    ("n-float", _chat(n=1.5), 400, "n", "invalid_type"),
    ("bad-role", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role", "invalid_value"),
    ("max-tokens-beyond-context", _chat(max_tokens=10_000), 400, "max_tokens", "context_length_exceeded"),
    ("max-tokens-zero", _chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
]


@pytest.mark.parametrize("name,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests(base_url, name, body, status, param, code):
    if isinstance(body, bytes):
        r = httpx.post(base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(base_url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert err["param"] == param
    assert err["code"] == code
    ok = httpx.post(base_url + "/v1/chat/completions", json=_chat(), timeout=30)  # still serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_bad_completion_requests_and_routes(base_url, client, backend):
    cases = [
        ({"prompt": [backend.vocab_size + 5], "max_tokens": 1}, 400, "invalid_token_id"),
        ({"prompt": "hi " * 200, "max_tokens": 1}, 400, "context_length_exceeded"),
        ({"prompt": "", "max_tokens": 1}, 400, "empty_prompt"),
        ({"prompt": 42}, 400, "invalid_type"),
        ({"prompt": "hi", "logprobs": "yes"}, 400, "invalid_type"),
    ]
    for body, status, code in cases:
        r = httpx.post(base_url + "/v1/completions", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code, (body, r.text)
    assert httpx.get(base_url + "/v1/nothing").status_code == 404
    assert httpx.get(base_url + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(base_url + "/v1/chat/completions").status_code == 405
    # through the openai client: typed exceptions carrying the server's message
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="beyond the context"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=100_000)
    assert client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2).choices


# --------------------------------------------------------------------------------------------------------------------
# concurrency: the queue, 429 when full, a disconnecting client frees its row at once; requests join a running batch


def _next_event(lines) -> str:
    """The next ``data:`` line from a response's ``iter_lines()`` (keep the iterator: dropping it closes the
    response)."""
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("stream ended without an event")


def _wait(cond, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_queue_full_429_and_disconnect_frees_slot(ckpt):
    slow = never_stop(load_backend(ckpt, device="cpu"), delay=0.02)  # ~50 tokens/s, never ends by itself
    with live_server(create_app(slow, max_concurrency=1, max_queue=1)) as url:
        health = lambda: httpx.get(url + "/health").json()  # noqa: E731
        long = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 100}
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", url + "/v1/chat/completions", json=long) as ra:
                a_lines = ra.iter_lines()
                _next_event(a_lines)  # A holds the only slot
                with b.stream("POST", url + "/v1/chat/completions", json=long) as rb:
                    b_lines = rb.iter_lines()
                    _wait(lambda: health()["queued"] == 1)  # B waits in the queue
                    full = httpx.post(url + "/v1/chat/completions", json=long)
                    assert full.status_code == 429
                    assert full.json()["error"]["code"] == "rate_limit_exceeded"
                    assert int(full.headers["retry-after"]) >= 1
                    ra.close()  # A's client disconnects mid-stream
                    t0 = time.monotonic()
                    _next_event(b_lines)  # ... and B starts at once
                    assert time.monotonic() - t0 < 1.0
                    assert health()["running"] == 1 and health()["queued"] == 0
            # B's client went away too: nothing keeps running
            _wait(lambda: health()["running"] == 0, timeout=2.0)
        # a non-streaming request whose client gives up is cancelled too (it would take > 2 s)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=dict(long, stream=False), timeout=0.5)
        _wait(lambda: health()["running"] == 0, timeout=1.5)
        ok = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 5}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_requests_join_a_running_batch_and_keep_their_own_answers(ckpt):
    slow = never_stop(load_backend(ckpt, device="cpu"), delay=0.02)
    with live_server(create_app(slow, max_concurrency=8)) as url:
        health = lambda: httpx.get(url + "/health").json()  # noqa: E731
        prompts = ["Hello there", "你好，世界", "To be, or not to be"]
        body = lambda p, n: {"messages": [{"role": "user", "content": p}], "stream": True,  # noqa: E731
                             "max_tokens": n, "temperature": 0, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=body("wait", 100)) as blocker:
                lines = blocker.iter_lines()
                _next_event(lines)  # the blocker is decoding: the next three requests join its batch
                streams = [httpx.Client(timeout=30) for _ in prompts]
                responses = [s.stream("POST", url + "/v1/chat/completions", json=body(p, 16 + i))
                             for i, (s, p) in enumerate(zip(streams, prompts))]
                opened = [r.__enter__() for r in responses]
                _wait(lambda: health()["sequences"] == 4)  # joined while the blocker still runs
                texts, usages = [], []
                for r in opened:
                    events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
                    texts.append("".join(e["choices"][0]["delta"].get("content") or ""
                                         for e in events if e["choices"]))
                    usages.append(events[-1]["usage"]["completion_tokens"])
                assert health()["sequences"] == 1  # the three left as they finished; the blocker goes on
                for r, s in zip(responses, streams):
                    r.__exit__(None, None, None)
                    s.close()
        assert usages == [16, 17, 18]  # each request keeps its own max_tokens inside the shared batch
        # the same requests one at a time give the same greedy replies
        for p, i, text in zip(prompts, range(3), texts):
            alone = httpx.post(url + "/v1/chat/completions", json=dict(body(p, 16 + i), stream=False), timeout=30)
            assert alone.json()["choices"][0]["message"]["content"] == text


# --------------------------------------------------------------------------------------------------------------------
# the scheduler itself, stepped by the test: requests arriving at different steps, each as if alone


def run_scheduler(sched, arrivals: dict[int, list], steps: int = 200) -> dict:
    """Submit ``arrivals[step]`` jobs before that step, step until every job is answered; returns job → result."""
    from pocketgpt.serve.app import Job

    results, jobs = {}, []
    for step in range(steps):
        for prompt, params in arrivals.get(step, []):
            job = Job([prompt], params)
            job.on_done = lambda res, job=job: results.__setitem__(job, res)
            sched.submit(job)
            jobs.append(job)
        sched.step()
        if len(results) == sum(map(len, arrivals.values())):
            return [results[j] for j in jobs]
    raise AssertionError("the scheduler did not answer every job")


@pytest.mark.parametrize("model_kind", ["fastdecode", "forward"])
def test_scheduler_greedy_requests_arriving_mid_decode_equal_alone(ckpt, model_kind):
    from pocketgpt.engine import SamplingParams
    from pocketgpt.serve.app import Scheduler

    backend = load_backend(ckpt, device="cpu")
    if model_kind == "forward":
        never_stop(backend)  # replies run to max_tokens, decoded through the model's own forward
    tok = backend.tokenizer
    texts = ("To be, or not", "你好，世界！今天天气很好，我们去公园散步吧。", "Hello", "The quick brown fox")
    prompts = [tok.encode(t) for t in texts]
    greedy = dict(temperature=0, stop_ids=backend.stop_ids)
    params = [SamplingParams(max_new_tokens=m, **greedy) for m in (30, 12, 25, 40)]
    alone = [generate(backend.model, [p], q, tokenizer=tok, return_logprobs=True)[0] for p, q in zip(prompts, params)]
    # a stop string from the middle of D's reply cuts it there, inside the shared batch too
    d_text = alone[3].text
    assert len(d_text) >= 8
    params[3] = SamplingParams(max_new_tokens=40, stop=[d_text[4:7]], **greedy)
    alone[3] = generate(backend.model, [prompts[3]], params[3], tokenizer=tok, return_logprobs=True)[0]
    assert alone[3].finish_reason == "stop" and alone[3].text == d_text[: d_text.index(d_text[4:7])]

    sched = Scheduler(backend, max_rows=8, max_queue=8)
    with torch.inference_mode():
        got = run_scheduler(sched, {0: [(prompts[0], params[0])], 3: [(prompts[1], params[1])],
                                    4: [(prompts[2], params[2])], 9: [(prompts[3], params[3])]})
    for (res,), want in zip(got, alone):
        assert res["tokens"] == want.tokens  # token ids equal to the request served alone
        assert res["text"] == want.text and res["finish_reason"] == want.finish_reason
    assert sched.batch.rows == [] and sched.rows_used == 0


def test_scheduler_mixed_sampling_options_with_seeds_reproduce_alone(ckpt):
    from pocketgpt.engine import SamplingParams
    from pocketgpt.serve.app import Scheduler

    backend = never_stop(load_backend(ckpt, device="cpu"))
    tok = backend.tokenizer
    prompts = [tok.encode(t) for t in ("To be", "你好，世界", "Hello there, how", "The quick")]
    params = [SamplingParams(max_new_tokens=20, temperature=0.7, top_k=20, seed=1, repetition_penalty=1.2),
              SamplingParams(max_new_tokens=15, temperature=0),
              SamplingParams(max_new_tokens=24, temperature=1.3, top_p=0.8, seed=2, n=3, frequency_penalty=0.5),
              SamplingParams(max_new_tokens=18, temperature=1.0, min_p=0.05, seed=3, presence_penalty=1.0)]
    alone = [generate(backend.model, [p], q, tokenizer=tok) for p, q in zip(prompts, params)]
    assert len({tuple(x) for x in alone[2]}) > 1  # the n samples of one request differ
    sched = Scheduler(backend, max_rows=16, max_queue=8)
    with torch.inference_mode():
        got = run_scheduler(sched, {0: [(prompts[0], params[0])], 2: [(prompts[1], params[1])],
                                    5: [(prompts[2], params[2]), (prompts[3], params[3])]})
    assert [[r["tokens"] for r in res] for res in got] == alone


def test_scheduler_disconnect_frees_its_rows_at_the_next_step(ckpt):
    from pocketgpt.engine import SamplingParams
    from pocketgpt.serve.app import Cancelled, Job, Scheduler

    backend = never_stop(load_backend(ckpt, device="cpu"))
    sched = Scheduler(backend, max_rows=8, max_queue=0)
    done = {}
    a, b = (Job([backend.tokenizer.encode(t)], SamplingParams(max_new_tokens=50, temperature=0, n=n))
            for t, n in (("To be", 1), ("Hello", 3)))
    for job in (a, b):
        job.on_done = lambda res, job=job: done.__setitem__(job, res)
        sched.submit(job)
    with torch.inference_mode():
        for _ in range(3):
            sched.step()
        assert len(sched.batch.rows) == 4 and sched.rows_used == 4
        sched.drop(b)  # its client went away mid-stream
        sched.step()
        assert len(sched.batch.rows) == 1 and sched.rows_used == 1  # freed at the next step; A goes on
        assert isinstance(done[b], Cancelled) and a not in done
        assert len(a.rows[0].tokens) == 4
        # the queue: 8 rows, no waiting room: a request that would have to wait is refused at once
        sched.submit(Job([[1, 2]], SamplingParams(max_new_tokens=5, n=7)))
        with pytest.raises(Exception) as e:
            sched.submit(Job([[1, 2]], SamplingParams(max_new_tokens=5)))
        assert e.value.status == 429 and e.value.headers["Retry-After"]


def test_per_row_filters_equal_the_filters_row_by_row():
    from pocketgpt.engine import min_p_filter, top_k_filter, top_p_filter

    torch.manual_seed(0)
    logits = torch.randn(5, 100) * 3
    ks, ps, ms = [0, 1, 5, 50, 200], [1.0, 0.1, 0.5, 0.9, 0.99], [0.0, 0.05, 0.3, 0.0, 0.9]
    by_row = lambda f, vs: torch.stack([f(logits[i : i + 1], v)[0] for i, v in enumerate(vs)])  # noqa: E731
    assert torch.equal(top_k_filter(logits, torch.tensor(ks)),
                       torch.stack([logits[0]] + [top_k_filter(logits[i : i + 1], k)[0] for i, k in enumerate(ks)
                                                  if k]))
    assert torch.equal(top_p_filter(logits, torch.tensor(ps)), by_row(top_p_filter, ps))
    assert torch.equal(min_p_filter(logits, torch.tensor(ms)), by_row(min_p_filter, ms))


def test_metrics_are_prometheus_text_and_count_requests(base_url):
    import re

    line_re = re.compile(r'^(# (HELP|TYPE) pocketgpt_\w+ .+|pocketgpt_\w+(\{\w+="[^"]*"\})? -?[0-9.e+-]+)$')

    def scrape() -> dict:
        r = httpx.get(base_url + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        lines = r.text.strip().split("\n")
        assert all(line_re.match(x) for x in lines), [x for x in lines if not line_re.match(x)]
        types = dict(x.split()[2:4] for x in lines if x.startswith("# TYPE"))
        assert types["pocketgpt_time_to_first_token_seconds"] == "histogram"
        assert types["pocketgpt_generated_tokens_total"] == "counter"
        assert types["pocketgpt_queue_depth"] == types["pocketgpt_active_sequences"] == "gauge"
        return {x.rsplit(" ", 1)[0]: float(x.rsplit(" ", 1)[1]) for x in lines if not x.startswith("#")}

    before = scrape()
    r = httpx.post(base_url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}).json()
    after = scrape()
    grew = {k: after[k] - before[k] for k in before}
    assert grew["pocketgpt_generated_tokens_total"] >= r["usage"]["completion_tokens"]
    assert grew["pocketgpt_time_to_first_token_seconds_count"] == 1
    assert grew['pocketgpt_requests_total{outcome="completed"}'] == 1
    ttft = "pocketgpt_time_to_first_token_seconds"
    assert after[ttft + '_bucket{le="+Inf"}'] == after[ttft + "_count"] >= after[ttft + '_bucket{le="0.025"}']
    assert after["pocketgpt_tokens_per_second"] > 0


def test_concurrent_requests_are_all_answered(base_url, client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": f"#{i}"}],
                                              max_tokens=8, seed=i)

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    assert all(r.choices[0].message.role == "assistant" for r in results)
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------------------------------------------------------
# the command, as a user runs it (in-process: serve_forever is caught and the app it gets is served on a free port)


def test_cli_serve_with_api_key_from_env(ckpt, monkeypatch):
    import pocketgpt.serve
    from pocketgpt.cli import main

    seen = {}
    monkeypatch.setattr(pocketgpt.serve, "serve_forever", lambda app, host, port: seen.update(app=app, host=host,
                                                                                            port=port))
    monkeypatch.setenv("POCKETGPT_API_KEY", "sekret")
    assert main(["serve", "--ckpt", str(ckpt), "--device", "cpu", "--max-concurrency", "3"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000  # loopback unless told otherwise
    with live_server(seen["app"]) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        missing = httpx.post(url + "/v1/chat/completions", json=body)
        wrong = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["error"]["code"] == wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        bad_json = httpx.post(url + "/v1/chat/completions", content=b"{", headers={"Authorization": "Bearer x"})
        assert bad_json.status_code == 401  # auth comes before anything else
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="tiny-chat", **body).choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(url + "/health").json()["max_concurrency"] == 3  # /health needs no key
        page = httpx.get(url + "/")  # nor does the page itself (it asks for the key)
        assert page.status_code == 200 and "pocketgpt" in page.text


@pytest.mark.parametrize("args,where", [
    (["--ckpt", "{tmp}/missing"], "missing: checkpoint directory not found"),
    (["--ckpt", "{ckpt}", "--max-concurrency", "0"], "--max-concurrency"),
    (["--ckpt", "{ckpt}", "--max-batch", "8"], "--max-batch: gone, the server batches continuously; --max-concurrency"),
    (["--ckpt", "{ckpt}", "--port", "70000"], "--port"),
    (["--ckpt", "{ckpt}", "--dtype", "fp8"], "--dtype"),
])
def test_cli_serve_user_errors(ckpt, tmp_path, capsys, args, where):
    from pocketgpt.cli import main

    argv = ["serve", *[a.format(tmp=tmp_path, ckpt=ckpt) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pocketgpt serve: error:") and where in err and "\n" not in err


def test_streamed_text_with_unicode_line_separators_stays_one_sse_line(base_url):
    # httpx's aiter_lines (like str.splitlines) also breaks at U+0085/2028/2029: the server must escape them
    text = "a\u2028b\u2029c\x85d"
    body = {"model": "tiny-chat", "prompt": text, "max_tokens": 2, "echo": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=30) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    assert chunks[0]["choices"][0]["text"] == text
