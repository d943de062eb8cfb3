"""``pocketgpt serve``: an OpenAI-compatible HTTP API and a web chat page for one checkpoint (the app itself is
``pocketgpt.serve.app.create_app``)."""

from __future__ import annotations

import os
from pathlib import Path

API_KEY_ENV = "POCKETGPT_API_KEY"


def load_backend(ckpt: str | os.PathLike, device: str = "auto", dtype: str = "fp32", model_name: str | None = None):
    """Load a checkpoint and its tokenizer into a ``Backend`` (the model side of the server)."""
    from ..checkpoint import find_checkpoint, load_checkpoint
    from .app import Backend

    ckpt = find_checkpoint(ckpt)
    model, tokenizer = load_checkpoint(ckpt, device, dtype)
    return Backend(model, tokenizer, model_name or run_name(ckpt))


def run_name(ckpt: Path) -> str:
    """The name a user knows a checkpoint by: its run's (``runs/sft/ckpt`` → ``sft``, ``runs/speedrun/dpo/ckpt`` →
    ``speedrun-dpo``), not the ``ckpt`` every run has."""
    path = ckpt.resolve()
    if path.name not in ("ckpt", "best"):
        return path.name
    run = path.parent
    if (run.parent / "speedrun_state.json").exists():
        return f"{run.parent.name}-{run.name}"
    return run.name


def serve_forever(app, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until Ctrl+C / SIGTERM, which first drops every queued or running generation (so
    open streams end at once)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.scheduler.close()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()
