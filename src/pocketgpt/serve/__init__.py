"""``pocketgpt serve``: an OpenAI-compatible HTTP API and web chat page for one checkpoint (``app.create_app``)."""

from __future__ import annotations

import os

API_KEY_ENV = "POCKETGPT_API_KEY"


def load_backend(ckpt: str | os.PathLike, device: str = "auto", dtype: str = "fp32", model_name: str | None = None):
    """A checkpoint as a ``Backend`` named as the user knows the run: runs/speedrun/dpo/ckpt is speedrun-dpo."""
    from ..checkpoint import find_checkpoint, load_checkpoint
    from .app import Backend

    ckpt = find_checkpoint(ckpt)
    model, tokenizer = load_checkpoint(ckpt, device, dtype)
    path = ckpt.resolve()
    run = path.parent
    name = path.name
    if name in ("ckpt", "best"):  # every run has one
        name = f"{run.parent.name}-{run.name}" if (run.parent / "speedrun_state.json").exists() else run.name
    return Backend(model, tokenizer, model_name or name)


def serve_forever(app, host: str, port: int) -> None:
    """uvicorn until Ctrl+C / SIGTERM, which first drops every queued or running generation (open streams end)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.scheduler.close()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()
