"""The OpenAI-compatible HTTP API (FastAPI) over the generation engine, and the web chat page.

Endpoints
    POST /v1/chat/completions   messages → reply (``stream: true`` = server-sent events ending in ``data: [DONE]``)
    POST /v1/completions        prompt text or token ids → continuation; ``logprobs`` (+ top alternatives), ``echo``;
                                ``max_tokens: 0`` + ``echo`` + ``logprobs`` scores the prompt (evaluation harnesses);
                                streamed completions carry text only (no ``logprobs``)
    GET  /v1/models             the one served model
    GET  /health                liveness + load (never needs the API key)
    GET  /metrics               Prometheus text: queue depth, active sequences, tokens, TTFT histogram (no API key)
    GET  /                      the web chat page (``serve/static/``)

Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``:
    400  malformed JSON, wrong field types, missing fields, values out of range (``param`` names the field), empty
         ``messages``, prompt or ``max_tokens`` beyond the context, bad token ids (as OpenAI: never 422)
    401  missing or wrong ``Authorization: Bearer KEY`` (when the server has an API key)
    404  unknown model (code ``model_not_found``), unknown route
    429  the queue is full (code ``rate_limit_exceeded``, with ``Retry-After``)

Sampling fields a request leaves out take pocketgpt's chat defaults (``pocketgpt.chat.CHAT_DEFAULTS``, with a mild
repetition penalty against the loops of small models), not OpenAI's temperature 1; ``top_k`` and
``repetition_penalty`` (1 = off) are accepted as in vLLM (``extra_body=`` in the openai client).

Concurrency: the event loop never runs the model; one decode thread does (``Scheduler``). It batches continuously: a
request is prefilled and joins the running batch at the next decode step, every step is one forward for all active
sequences (each with its own sampling options, stop strings and ``n``), and a sequence leaves the batch as soon as it
finishes or its client disconnects (mid-stream, or while waiting for a non-streamed answer). At most
``max_concurrency`` sequences decode together; up to ``max_queue`` more requests wait, one more is answered 429 with
``Retry-After``. ``GET /metrics`` shows the queue, the batch, tokens/s and time to first token (Prometheus text).

Special tokens are never text: every special token (``<|end|>``, ``<|user|>``, ``<|endoftext|>``...) ends a reply or
a completion (a model that writes one has finished its text), and an echoed prompt shows its text only (special
tokens are empty strings in ``logprobs.tokens``; ``top_logprobs`` keys keep their names so alternatives stay distinct).

Log-probs (``logprobs``, ``echo``) are those of the raw model distribution (temperature 1, no filters), from one
forward pass over prompt + completion (``engine.sequence_logprobs``), whatever sampling options chose the tokens.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import ctypes
import functools
import hmac
import itertools
import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import SamplingParams, stop_prefix_len
from ..errors import UserError
from .schemas import APIError, ChatCompletionRequest, CompletionRequest

STATIC = Path(__file__).parent / "static"


_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class Cancelled(Exception):
    """The outcome of a job whose client went away."""


# --------------------------------------------------------------------------------------------------------------------
# the model side: everything here runs on the decode thread


class Backend:
    """The served model + tokenizer: chat rendering, prompt scoring (on the decode thread, which owns the model)."""

    def __init__(self, model, tokenizer, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = next(model.parameters()).device
        self.context = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.stop_ids = sorted(tokenizer.special_ids.values())  # chat and completions alike: see the docstring

    # ---- prompts -------------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        from ..chat import render

        ids, _ = render(messages, self.tokenizer, add_generation_prompt=True)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special=True)

    def token_str(self, i: int, special_names: bool = False) -> str:
        """A token in ``logprobs``: a special token is empty (never text) unless ``special_names``; the bytes of a
        partial character are escaped (``\\xe4``), never U+FFFD (``token_bytes`` has them exactly)."""
        if not special_names and i in self.stop_ids:
            return ""
        return self.token_bytes(i).decode("utf-8", errors="backslashreplace")

    def token_bytes(self, i: int) -> bytes:
        return self.tokenizer.decode_bytes([int(i)])

    # ---- scoring ---------------------------------------------------------------------------------------------------

    def score(self, ids: list[int], top: int) -> tuple[list[Optional[float]], list[Optional[list[tuple[int, float]]]]]:
        """log p(token | the tokens before it) for every token (``None`` for the first: nothing predicts it), and
        the ``top`` most likely tokens at each position (``[(id, logprob)]``), from the raw model distribution."""
        from .. import engine

        if not ids:
            return [], []
        (chosen,) = engine.sequence_logprobs(self.model, [ids])
        lps: list[Optional[float]] = [None, *chosen]
        tops: list[Optional[list[tuple[int, float]]]] = [None] + [[] for _ in chosen]
        if top > 0 and len(ids) > 1:
            with torch.inference_mode():
                logits, _ = self.model(torch.tensor([ids[:-1]], dtype=torch.long, device=self.device))
                vals, idx = torch.log_softmax(logits[0].float(), dim=-1).topk(min(top, logits.shape[-1]), dim=-1)
            tops = [None] + [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return lps, tops


# --------------------------------------------------------------------------------------------------------------------
# jobs and the scheduler: one decode loop over every active request (continuous batching), a bounded queue


class Job:
    """One prompt to continue with ``params`` (``params.n`` rows): the unit the scheduler queues and decodes.

    ``on_text([(sample, piece), ...])`` (streaming) and ``on_done(results | exception)`` are called through the
    scheduler's ``post`` (on the event loop); results are ``[{"tokens", "text", "finish_reason"}] * n``, the
    exception ``Cancelled`` when the client left."""

    def __init__(self, prompt: list[int], params: SamplingParams):
        self.prompt, self.params, self.n = prompt, params, params.n
        self.on_text: Optional[Callable[[list], None]] = None
        self.on_done: Callable[[Any], None] = lambda result: None
        self.cancelled = self.admitted = self.ended = self.started = False
        self.rows: list = []
        self.emitted = [0] * self.n
        self.submitted = time.perf_counter()
        self.future: Optional[asyncio.Future] = None  # the app's


class Metrics:
    """What ``/metrics`` shows (Prometheus text format): counters kept by the decode thread."""

    TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
    WINDOW = 10.0  # seconds the tokens/s gauge averages over

    def __init__(self):
        self.tokens = 0
        self.recent: collections.deque = collections.deque()  # (time, tokens) of each step in the window
        self.ttft = [0] * len(self.TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.requests = collections.Counter()  # by outcome

    def step(self, now: float, tokens: int) -> None:
        self.tokens += tokens
        self.recent.append((now, tokens))
        while self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()

    def first_token(self, seconds: float) -> None:
        self.ttft[bisect.bisect_left(self.TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def render(self, queued: int, requests: int, sequences: int) -> str:
        now = time.perf_counter()
        rate = sum(n for t, n in list(self.recent) if t >= now - self.WINDOW) / self.WINDOW
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP pocketgpt_{name} {help_}", f"# TYPE pocketgpt_{name} {kind}"])
            lines.extend(f"pocketgpt_{name}{labels} {value:g}" for labels, value in samples)

        metric("queue_depth", "gauge", "Requests waiting to join the running batch.", [("", queued)])
        metric("active_requests", "gauge", "Requests in the running batch.", [("", requests)])
        metric("active_sequences", "gauge", "Sequences (rows) in the running batch.", [("", sequences)])
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.tokens)])
        metric("tokens_per_second", "gauge", f"Tokens generated per second over the last {self.WINDOW:g} s.",
               [("", rate)])
        metric("requests_total", "counter", "Requests by outcome.",
               [(f'{{outcome="{k}"}}', self.requests[k]) for k in ("completed", "cancelled", "rejected", "failed")])
        cumulative = list(itertools.accumulate(self.ttft))
        metric("time_to_first_token_seconds", "histogram", "From arrival to the first generated token.",
               [(f'_bucket{{le="{"+Inf" if b == float("inf") else f"{b:g}"}"}}', c)
                for b, c in zip(self.TTFT_BUCKETS, cumulative)]
               + [("_sum", self.ttft_sum), ("_count", cumulative[-1])])
        return "\n".join(lines) + "\n"


class Scheduler:
    """The one decode loop. A thread that owns the model runs decode steps over the rows of every active request
    (``engine.DecodeBatch``: one forward per step for all rows, each row with its own sampling options). Between two
    steps it runs queued calls (scoring), prefills the requests that arrived (one left-padded forward for all of
    them, so a burst of arrivals costs one forward, not one each) and lets them join, and removes the rows of requests whose client left; a finished row
    leaves at once. At most ``max_rows`` rows decode together (a request larger than that runs when the batch is
    empty); more requests wait, at most ``max_queue`` of them (``submit`` answers 429 beyond). After each step the
    new text of every request goes out in one ``post`` (``loop.call_soon_threadsafe`` once ``start``-ed; tests call
    ``step()`` themselves)."""

    def __init__(self, backend: Backend, max_rows: int, max_queue: int):
        from ..engine import DecodeBatch

        self.backend, self.max_rows, self.max_queue = backend, max_rows, max_queue
        self.new_batch = lambda: DecodeBatch(backend.model, backend.tokenizer)
        self.batch = self.new_batch()
        self.lock = threading.Condition()
        self.waiting: collections.deque = collections.deque()  # guarded by lock
        self.calls: list = []  # (fn, on_done), guarded by lock
        self.rows_used = 0  # rows of admitted jobs, guarded by lock
        self.active: list[Job] = []  # the decode thread's
        self.closed = False
        self.thread: Optional[threading.Thread] = None
        self.post: Callable = lambda fn, *args: fn(*args)
        self.metrics = Metrics()

    def start(self, post: Callable) -> None:
        if self.thread is None:
            self.post = post
            self.thread = threading.Thread(target=self._run, name="pocketgpt-decode", daemon=True)
            self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none): an ``APIError`` 429 with ``Retry-After`` when they would wait in a full
        queue."""
        with self.lock:
            rows = self.rows_used + sum(j.n for j in self.waiting) + sum(j.n for j in jobs)
            if self.closed or (rows > self.max_rows and len(self.waiting) + len(jobs) > self.max_queue):
                self.metrics.requests["rejected"] += len(jobs)
                raise APIError(429, f"server is at capacity ({self.rows_used} sequences decoding, "
                                    f"{len(self.waiting)} requests queued); retry shortly", type="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.waiting.extend(jobs)
            self.lock.notify()

    def drop(self, job: Job) -> None:
        """The client went away: a waiting job is forgotten now, an active one leaves before the next step."""
        job.cancelled = True
        with self.lock:
            waiting = job in self.waiting
            if waiting:
                self.waiting.remove(job)
        if waiting:
            out: list = []
            self._end(job, Cancelled(), out)
            self._deliver(out)

    def call(self, fn: Callable[[], Any], on_done: Callable[[Any], None]) -> None:
        """Run ``fn`` on the decode thread before the next step; ``on_done(result or exception)`` via ``post``."""
        with self.lock:
            self.calls.append((fn, on_done))
            self.lock.notify()

    def close(self) -> None:
        """Stop the loop (from any thread): every job still queued or running ends as ``Cancelled``."""
        with self.lock:
            self.closed = True
            self.lock.notify()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    if not (self.closed or self.waiting or self.calls or self.active):
                        _trim_heap()  # idle: give the freed cache back to the system
                    while not (self.closed or self.waiting or self.calls or self.active):
                        self.lock.wait()
                    if self.closed:
                        break
                self.step()
        out: list = []
        with self.lock:
            jobs, calls = [*self.active, *self.waiting], self.calls
            self.waiting.clear()
            self.calls = []
        for job in jobs:
            self._end(job, Cancelled(), out)
        out += [(on_done, Cancelled()) for _, on_done in calls]
        self.post(self._deliver, out)

    def step(self) -> None:
        """Calls, joins and departures, then one decode step; what it produced goes out in one ``post``."""
        out: list = []  # (callback, argument), run on the event loop in this order
        with self.lock:
            calls, self.calls = self.calls, []
            admit = []
            while self.waiting and (self.rows_used == 0 or self.rows_used + self.waiting[0].n <= self.max_rows):
                job = self.waiting.popleft()
                job.admitted = True
                self.rows_used += job.n
                admit.append(job)
            self.active += admit  # running from now on (their prefill comes next)
        for fn, on_done in calls:
            try:
                out.append((on_done, fn()))
            except Exception as e:  # noqa: BLE001 - the caller's error, answered to the caller
                out.append((on_done, e))
        try:
            for job in admit:
                if job.cancelled:
                    self._end(job, Cancelled(), out)
            joining = [job for job in admit if not job.ended]
            if joining:  # one prefill forward for all the requests that arrived during the last step
                rows = iter(self.batch.add([job.prompt for job in joining], [job.params for job in joining]))
                for job in joining:
                    job.rows = [next(rows) for _ in range(job.n)]
            gone = [job for job in self.active if job.cancelled and not job.ended]
            if gone:
                self.batch.drop([r for job in gone for r in job.rows])
                for job in gone:
                    self._end(job, Cancelled(), out)
            rows = len(self.batch.rows)
            self.batch.step()
            if rows:
                self.metrics.step(time.perf_counter(), rows)
            for job in self.active:
                if not job.ended:
                    self._emit(job, out)
        except Exception as e:  # a failed step fails the requests in it, not the server
            for job in self.active:
                self._end(job, e, out)
            self.batch = self.new_batch()
        self.active = [job for job in self.active if not job.ended]
        if out:
            self.post(self._deliver, out)

    def _emit(self, job: Job, out: list) -> None:
        """The job's new text (held back while it may be the start of a stop string), its answer once done."""
        pieces, stops = [], job.params.stop
        for k, r in enumerate(job.rows):
            end = len(r.text) if r.done else len(r.text) - stop_prefix_len(r.text, stops)
            if end > job.emitted[k]:
                pieces.append((k, r.text[job.emitted[k] : end]))
                job.emitted[k] = end
        if not job.started and any(r.tokens or r.done for r in job.rows):
            job.started = True
            self.metrics.first_token(time.perf_counter() - job.submitted)
        if pieces and job.on_text is not None:
            out.append((job.on_text, pieces))
        if all(r.done for r in job.rows):
            self._end(job, [{"tokens": list(r.tokens), "text": r.text,
                             "finish_reason": "stop" if r.reason == "stop" else "length"} for r in job.rows], out)

    def _end(self, job: Job, result: Any, out: list) -> None:
        if job.ended:
            return
        job.ended = True
        if job.admitted:
            with self.lock:
                self.rows_used -= job.n
        outcome = "completed" if isinstance(result, list) else "cancelled" if isinstance(result, Cancelled) \
            else "failed"
        self.metrics.requests[outcome] += 1
        out.append((job.on_done, result))

    @staticmethod
    def _deliver(out: list) -> None:
        for fn, arg in out:
            fn(arg)


# --------------------------------------------------------------------------------------------------------------------
# the app


def create_app(backend: Backend, *, api_key: Optional[str] = None, max_concurrency: int = 64,
               max_queue: int = 256) -> FastAPI:
    """The FastAPI app serving ``backend``: up to ``max_concurrency`` sequences decode together in one continuous
    batch; ``max_queue`` more requests may wait. ``api_key`` guards every ``/v1/*`` route."""
    sched = Scheduler(backend, max_concurrency, max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start(asyncio.get_running_loop().call_soon_threadsafe)
        yield
        sched.close()  # shutting down: every queued or running request ends now
        await asyncio.to_thread(sched.thread.join, 5)

    app = FastAPI(title="pocketgpt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.backend, app.state.scheduler = backend, sched

    # ---- errors ------------------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(_validation_to_api_error(e.errors()))

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError):
        return _error_response(APIError(400, str(e)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = APIError(404, f"unknown route {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail))
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    # ---- plain routes ----------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_id, "running": len(sched.active), "queued": len(sched.waiting),
                "sequences": len(sched.batch.rows), "max_concurrency": sched.max_rows, "max_queue": sched.max_queue}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        text = sched.metrics.render(len(sched.waiting), len(sched.active), len(sched.batch.rows))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(backend, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(backend, model_id)
        return _model_card(backend, created)

    # ---- generation --------------------------------------------------------------------------------------------

    def submit(jobs: list[Job]) -> list[asyncio.Future]:
        """Queue ``jobs`` (429 now if the queue is full); each future resolves with its job's answer."""
        loop = asyncio.get_running_loop()
        sched.start(loop.call_soon_threadsafe)  # (normally started by the lifespan)
        futures = []
        for job in jobs:
            job.future = loop.create_future()
            job.on_done = functools.partial(_settle, job.future)
            futures.append(job.future)
        sched.submit(jobs)
        return futures

    async def on_model(fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the decode thread (the one that owns the model), between two steps."""
        future = asyncio.get_running_loop().create_future()
        sched.call(fn, functools.partial(_settle, future))
        return await future

    async def answer(request: Request, jobs: list[Job]) -> list[list[dict]]:
        """Queue ``jobs`` and wait for all of them; if the client goes away meanwhile, drop them."""
        futures = submit(jobs)
        try:
            while True:
                done, pending = await asyncio.wait(futures, timeout=0.25)
                if not pending:
                    return [f.result() for f in futures]
                if await request.is_disconnected():  # nobody will read the answer
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        finally:
            for job in jobs:
                if not job.future.done():
                    sched.drop(job)

    def stream(jobs: list[Job], first: Callable[[int], list[dict]], piece: Callable[[int, str], dict],
               last: Callable[[int, dict], dict], usage: Callable[[int], Optional[dict]]) -> StreamingResponse:
        """Queue ``jobs`` and answer with server-sent events as they decode, ending in ``data: [DONE]``.

        ``first(index)`` (events before any text), ``piece(index, text)``, ``last(index, result)`` build the events
        of choice ``index`` (= job number * n + sample); ``usage(completion_tokens)`` the closing one, if any.
        """
        inbox: collections.deque = collections.deque()  # (choice index, text) pieces, then each job's future
        wake = asyncio.Event()

        def put(item: Any) -> None:
            inbox.append(item)
            wake.set()

        for j, job in enumerate(jobs):  # each step's pieces, delivered on the loop
            job.on_text = lambda pieces, base=j * job.n: [put((base + k, text)) for k, text in pieces]
        submit(jobs)  # 429 now, before the response starts, if the queue is full
        for job in jobs:  # resolved after every piece of text it produced has been put in the inbox
            job.future.add_done_callback(put)

        async def events() -> AsyncIterator[bytes]:
            def sse(obj: dict) -> bytes:  # U+0085/2028/2029 escaped: clients that split lines like splitlines() break there
                text = json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)
                return b"data: " + text.encode() + b"\n\n"

            try:
                for j, job in enumerate(jobs):
                    for k in range(job.n):
                        for event in first(j * job.n + k):
                            yield sse(event)
                remaining, completion_tokens = len(jobs), 0
                while remaining:
                    while not inbox:
                        wake.clear()
                        await wake.wait()
                    item = inbox.popleft()
                    if not isinstance(item, asyncio.Future):
                        # pieces that piled up while we were sending go out as one event
                        index, text = item
                        while inbox and isinstance(inbox[0], tuple) and inbox[0][0] == index:
                            text += inbox.popleft()[1]
                        yield sse(piece(index, text))
                        continue
                    remaining -= 1
                    j = next(i for i, job in enumerate(jobs) if job.future is item)
                    if item.exception() is not None:
                        e = item.exception()
                        if isinstance(e, Cancelled):
                            return
                        err = e if isinstance(e, APIError) else APIError(
                            500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                        yield sse(err.body())  # the stream has started: the error goes in-band
                        break
                    for k, result in enumerate(item.result()):
                        completion_tokens += len(result["tokens"])
                        yield sse(last(j * jobs[j].n + k, result))
                else:
                    closing = usage(completion_tokens)
                    if closing is not None:
                        yield sse(closing)
                yield b"data: [DONE]\n\n"
            finally:
                for job in jobs:  # the client went away (or we are done): stop what still runs
                    if not job.future.done():
                        sched.drop(job)

        return _SSEResponse(events(), on_close=lambda: [sched.drop(job) for job in jobs if not job.future.done()])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(backend, body.model)
        if not body.messages:
            raise APIError(400, "'messages' is empty: send at least one message", param="messages",
                           code="empty_messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt = backend.chat_prompt(messages)
        max_tokens = _max_tokens(backend, len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        job = Job(prompt, _params(backend, body, max_tokens))
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        top = (body.top_logprobs or 0) if body.logprobs else 0

        if body.stream:
            def chunk(choices: list, usage: Optional[dict] = None) -> dict:
                c = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": backend.model_id,
                     "system_fingerprint": None, "choices": choices}
                if include_usage:
                    c["usage"] = usage
                return c

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream(
                [job],
                first=lambda i: [chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])],
                piece=lambda i, text: chunk([{"index": i, "delta": {"content": text}, "logprobs": None,
                                              "finish_reason": None}]),
                last=lambda i, res: chunk([{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": res["finish_reason"]}]),
                usage=lambda n_tokens: chunk([], _usage(len(prompt), n_tokens)) if include_usage else None,
            )

        (outs,) = await answer(request, [job])
        choices = []
        for i, o in enumerate(outs):
            choice = {"index": i, "message": {"role": "assistant", "content": o["text"]}, "logprobs": None,
                      "finish_reason": o["finish_reason"]}
            if body.logprobs:
                content = await on_model(functools.partial(_chat_logprobs, backend, prompt, o["tokens"], top))
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": now, "model": backend.model_id,
                "system_fingerprint": None, "choices": choices,
                "usage": _usage(len(prompt), sum(len(o["tokens"]) for o in outs))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(backend, body.model)
        prompts = _completion_prompts(backend, body)
        for p in prompts:
            _max_tokens(backend, len(p), body.max_tokens, "prompt")
        if body.max_tokens == 0 and body.stream:
            raise APIError(400, "'max_tokens': 0 only scores the prompt; use it without 'stream'",
                           param="max_tokens", code="invalid_value")
        params = _params(backend, body, body.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        n_prompt = sum(map(len, prompts))

        if body.stream:
            def chunk(choices: list, usage: Optional[dict] = None) -> dict:
                c = {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id,
                     "choices": choices}
                if include_usage:
                    c["usage"] = usage
                return c

            def text_chunk(i: int, text: str, finish: Optional[str] = None) -> dict:
                return chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": finish}])

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            jobs = [Job(p, params) for p in prompts]
            return stream(
                jobs,
                first=lambda i: [text_chunk(i, backend.decode(prompts[i // body.n]))] if body.echo else [],
                piece=text_chunk,
                last=lambda i, res: text_chunk(i, "", res["finish_reason"]),
                usage=lambda n_tokens: chunk([], _usage(n_prompt, n_tokens)) if include_usage else None,
            )

        if body.max_tokens == 0:  # score the prompt only
            outs = [[{"tokens": [], "text": "", "finish_reason": "length"}] * body.n for _ in prompts]
        else:
            outs = await answer(request, [Job(p, params) for p in prompts])
        choices, completion_tokens = [], 0
        for pi, (prompt, samples) in enumerate(zip(prompts, outs)):
            for j, o in enumerate(samples):
                completion_tokens += len(o["tokens"])
                choice = {"index": pi * body.n + j, "text": (backend.decode(prompt) if body.echo else "") + o["text"],
                          "logprobs": None, "finish_reason": o["finish_reason"]}
                if body.logprobs is not None:
                    choice["logprobs"] = await on_model(functools.partial(
                        _completion_logprobs, backend, prompt, o["tokens"], body.logprobs, body.echo))
                choices.append(choice)
        return {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id,
                "system_fingerprint": None, "choices": choices, "usage": _usage(n_prompt, completion_tokens)}

    return app


# --------------------------------------------------------------------------------------------------------------------
# helpers


class _APIKeyMiddleware:
    """Every ``/v1/*`` request needs ``Authorization: Bearer KEY`` (plain ASGI: streams pass through untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not header else "incorrect API key"
                await _error_response(APIError(401, msg, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SSEResponse(StreamingResponse):
    """``text/event-stream`` that calls ``on_close`` however the response ends (done, disconnect, error)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_to_api_error(errors: list[dict]) -> APIError:
    """FastAPI/pydantic validation errors → one OpenAI-style 400 error (OpenAI never answers 422; clients branch
    on the status)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error") or first.get("msg", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc and first.get("type") == "missing":
        return APIError(400, "the request needs a JSON object body", code="invalid_json")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    # drop pydantic's union-member tags (e.g. "str", "list[int]") from the path
    param = ".".join(x for x in loc if not (x.startswith(("list[", "str", "int", "float", "bool", "function-"))
                                            or x in ("TextPart",)))
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param=param or None, code="invalid_type"
                    if "type" in str(first.get("type", "")) else "invalid_value")


def _check_model(backend: Backend, name: Optional[str]) -> None:
    if name is not None and name != backend.model_id:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{backend.model_id}'",
                       param="model", code="model_not_found")


def _model_card(backend: Backend, created: int) -> dict:
    return {"id": backend.model_id, "object": "model", "created": created, "owned_by": "pocketgpt",
            "context_length": backend.context}


def _max_tokens(backend: Backend, prompt_len: int, requested: Optional[int], prompt_param: str) -> int:
    room = backend.context - prompt_len
    if room < 0 or (room == 0 and requested != 0):
        raise APIError(400, f"the prompt is {prompt_len} tokens, beyond the model's context of {backend.context} "
                            "tokens", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"max_tokens={requested} is beyond the context: the prompt takes {prompt_len} of "
                            f"{backend.context} tokens, leaving {room}", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def _params(backend: Backend, body, max_tokens: int) -> SamplingParams:
    from ..chat import CHAT_DEFAULTS

    sampling = {k: CHAT_DEFAULTS[k] if getattr(body, k) is None else getattr(body, k) for k in CHAT_DEFAULTS}
    return SamplingParams(**sampling, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          seed=body.seed, stop=body.stop_list(), max_new_tokens=max_tokens, n=body.n,
                          stop_ids=backend.stop_ids)


def _trim_heap() -> None:
    """glibc keeps freed mid-sized blocks in its arenas (an idle server would keep its peak RSS): hand them back."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _settle(future: asyncio.Future, result: Any) -> None:
    """Resolve ``future`` with a job's or call's outcome (an exception is raised to whoever awaits it)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
        if isinstance(result, Cancelled):
            future.exception()  # nobody may be waiting for a dropped job: not an error to log
    else:
        future.set_result(result)


def _completion_prompts(backend: Backend, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        prompts = [backend.tokenizer.encode(p)]
    elif not p:
        raise APIError(400, "'prompt' is empty", param="prompt", code="empty_prompt")
    elif isinstance(p[0], str):
        prompts = [backend.tokenizer.encode(s) for s in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    for i, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, f"prompt {i} has no tokens", param="prompt", code="empty_prompt")
        bad = [t for t in ids if not 0 <= t < backend.vocab_size]
        if bad:
            raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {backend.vocab_size})",
                           param="prompt", code="invalid_token_id")
    return prompts


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(x: Optional[float]) -> Optional[float]:
    """JSON has no -inf: clamp impossible tokens to a very small log-probability."""
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def _completion_logprobs(backend: Backend, prompt: list[int], tokens: list[int], top: int, echo: bool) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset (prompt too with echo)."""
    ids = list(prompt) + list(tokens)
    lps, tops = backend.score(ids, top)
    start = 0 if echo else len(prompt)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for t in range(start, len(ids)):
        s = backend.token_str(ids[t])
        out["tokens"].append(s)
        out["token_logprobs"].append(_finite(lps[t]))
        out["top_logprobs"].append(None if tops[t] is None else
                                   {backend.token_str(i, True): _finite(v) for i, v in tops[t]})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _chat_logprobs(backend: Backend, prompt: list[int], tokens: list[int], top: int) -> list[dict]:
    lps, tops = backend.score(list(prompt) + list(tokens), top)
    out = []
    for k, tok in enumerate(tokens):
        t = len(prompt) + k
        s = backend.token_str(tok)
        out.append({"token": s, "logprob": _finite(lps[t]), "bytes": list(backend.token_bytes(tok)),
                    "top_logprobs": [{"token": backend.token_str(i, True), "logprob": _finite(v),
                                      "bytes": list(backend.token_bytes(i))} for i, v in tops[t]]})
    return out
