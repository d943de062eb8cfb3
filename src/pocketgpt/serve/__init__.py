"""``pocketgpt serve``: an OpenAI-compatible HTTP API and a web chat page for one checkpoint.

    pocketgpt serve --ckpt runs/sft [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-concurrency N]

Then ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`` works, and the page at
``http://127.0.0.1:8000/`` chats in the browser. The app itself is ``pocketgpt.serve.app.create_app``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UserError

API_KEY_ENV = "POCKETGPT_API_KEY"


def configure_cli(name, p) -> None:
    p.add_argument("--ckpt", required=True,
                   help="checkpoint directory (with tokenizer/), a run directory holding one, or a Hugging Face dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--max-concurrency", type=int, default=1,
                   help="batches decoding at once, each in a worker thread (default 1)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="simultaneous requests with the same sampling options decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before the server answers 503 (default 256)")
    p.add_argument("--model-name", default=None,
                   help="model id the API reports (default: the run's name, e.g. speedrun-dpo for runs/speedrun/dpo)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per forward pass (default: cores / max-concurrency, at least 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="fp32", help="weights precision: fp32, bf16, fp16 (default fp32)")
    p.set_defaults(func=_run)


def load_backend(ckpt: str | os.PathLike, device: str = "auto", dtype: str = "fp32", model_name: str | None = None):
    """Load a checkpoint and its tokenizer into a ``Backend`` (the model side of the server)."""
    from ..chat import find_checkpoint
    from ..checkpoint import load_model
    from ..runtime import DTYPES, pick_device
    from ..tokenizer import load_tokenizer_for
    from .app import Backend

    ckpt = find_checkpoint(ckpt)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown precision {dtype!r} (fp32, bf16, fp16)")
    dev = pick_device(device)
    tokenizer = load_tokenizer_for(ckpt)
    model = load_model(ckpt, device=dev, dtype=DTYPES[dtype])
    return Backend(model, tokenizer, model_name or run_name(ckpt))


def run_name(ckpt: Path) -> str:
    """The name a user knows a checkpoint by: its run's (``runs/sft/ckpt`` → ``sft``; a speedrun stage's
    ``runs/speedrun/dpo/ckpt`` → ``speedrun-dpo``), not the ``ckpt`` every run has."""
    path = ckpt.resolve()
    if path.name not in ("ckpt", "best"):
        return path.name
    run = path.parent
    if (run.parent / "speedrun_state.json").exists():
        return f"{run.parent.name}-{run.name}"
    return run.name


def serve_forever(app, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until Ctrl+C / SIGTERM. On the signal every queued or running generation is dropped
    first, so open streams end at once and the server stops without waiting for them."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            sched = app.state.scheduler
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.call_soon_threadsafe(lambda: [sched.drop(j) for j in [*sched.waiting, *sched.running]])
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()


def _run(args) -> int:
    try:  # the optional `serve` extra
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"{e.name} is not installed: pip install 'pocketgpt[serve]'") from None
    from .app import create_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: {args.port} is not a TCP port (0-65535)")
    if args.max_concurrency < 1:
        raise UserError(f"--max-concurrency: must be at least 1, got {args.max_concurrency}")
    if args.max_batch < 1:
        raise UserError(f"--max-batch: must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue: must be 0 or more, got {args.max_queue}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: must be at least 1, got {args.threads}")
    import torch

    # concurrency comes from the worker threads: oversubscribing the cores with intra-op threads is much slower
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.max_concurrency))
    # the event loop and the decoding threads share the GIL: switch often, so that a decoding step never waits
    # the default 5 ms each time the loop thread is busy sending events
    sys.setswitchinterval(0.0005)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    backend = load_backend(args.ckpt, args.device, args.dtype, args.model_name)
    app = create_app(backend, api_key=api_key, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                     max_batch=args.max_batch)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"pocketgpt serve: model '{backend.model_id}' ({backend.model.num_params() / 1e6:.1f}M params, context "
          f"{backend.context}) on http://{shown}:{args.port}/  (API: /v1, "
          f"{'API key required' if api_key else 'no API key'})", flush=True)
    serve_forever(app, args.host, args.port)
    return 0
