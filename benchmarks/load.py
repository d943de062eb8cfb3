"""Load test of ``pocketgpt serve`` on loopback: many concurrent streaming clients, then many that hang up.

    .venv/bin/python benchmarks/load.py                  # 1, then 16 and 64 clients x 4 streamed chats of 128 tokens
    .venv/bin/python benchmarks/load.py --ckpt runs/sft  # against a real checkpoint
    .venv/bin/python benchmarks/load.py --clients 8,128 --requests 8 --max-tokens 64 --max-concurrency 32

The default model is random, of the 10.7M shape (6L/384d, context 256; 11.5M with its 1024-token BPE vocabulary, untied),
made never to write a special token, so every reply is ``--max-tokens`` long.
Phase 1: one client alone, then each ``--clients`` count: every client sends its requests one after another
(``stream: true``, usage included); reports errors, time-to-first-token p50/p99 (from sending the request to the
first content piece) and aggregate tokens/s as a ratio to one client alone, measured in the same run, beside the
goals of issue 17 (>= 8x one client at 16 and 64 clients, p99 TTFT <= 1 s at 16, 0 errors).
Phase 2: as many clients as the largest count start long streams and disconnect after a few events; the server must drop
every one of them (``/health`` running and queued back to 0), answer a follow-up request normally, and its RSS
must come back to the baseline taken before phase 1.

Bounded: the server binds 127.0.0.1 only, every phase has a deadline (``--timeout``) and the script stops the
server it started in all cases. Prints figures only; exit code 1 when a check fails.
"""

from __future__ import annotations

import os
import sys

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(directory: Path, n_layer: int, n_embd: int, block_size: int) -> Path:
    """A random GPT and a BPE tokenizer (trained on a slice of the bundled Shakespeare + Chinese text); the model
    never writes a special token (every reply runs to max_tokens)."""
    import torch

    from pocketgpt import GPT, GPTConfig
    from pocketgpt.checkpoint import save_model
    from pocketgpt.tokenizer import Tokenizer

    corpus = []
    shakespeare = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    for p in (shakespeare, Path("/work/shared/data/tinyshakespeare.txt")):
        if p.is_file():
            corpus.append(p.read_text(encoding="utf-8")[:200_000])
            break
    corpus.append("你好，世界！今天天气很好，我们去公园散步吧。宋江道：兄弟们，我们一起喝酒。" * 50)
    corpus.append("The quick brown fox jumps over the lazy dog. Hello there, how are you today? " * 50)
    tok = Tokenizer.train("bpe", corpus, vocab_size=1024)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer,
                          n_head=max(1, n_embd // 64), n_embd=n_embd, tie_embeddings=False))
    with torch.no_grad():  # a final-norm bias along u and special-token rows along -u: their logits sit near -50
        u = torch.nn.functional.normalize(torch.randn(n_embd), dim=0)
        model.ln_f.bias.copy_(10 * u)
        model.lm_head.weight[sorted(tok.special_ids.values())] = -5 * u
    save_model(model, directory)
    tok.save(directory / "tokenizer")
    return directory


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


# --------------------------------------------------------------------------------------------------------------------
# clients


async def stream_chat(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """One streamed chat request; returns (time to first content piece, completion tokens)."""
    body = {"messages": [{"role": "user", "content": f"Tell me a story, number {i}."}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = None
    done = False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"in-stream error: {chunk['error']['message']}")
            for c in chunk["choices"]:
                if ttft is None and c["delta"].get("content"):
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not done or tokens is None:
        raise RuntimeError("stream ended without usage and [DONE]")
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def client_loop(url: str, cid: int, n_requests: int, max_tokens: int, out: dict) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        for k in range(n_requests):
            try:
                ttft, tokens = await stream_chat(client, url, cid * 1000 + k, max_tokens)
                out["ttft"].append(ttft)
                out["tokens"] += tokens
            except Exception as e:  # counted, shown once
                out["errors"].append(f"{type(e).__name__}: {e}")


async def run_load(url: str, clients: int, n_requests: int, max_tokens: int) -> dict:
    out = {"ttft": [], "tokens": 0, "errors": []}
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(url, c, n_requests, max_tokens, out) for c in range(clients)))
    out["seconds"] = time.perf_counter() - t0
    return out


async def hang_up(url: str, cid: int, events: int, max_tokens: int, out: dict) -> None:
    """Start a long stream, read a few events, then drop the connection."""
    body = {"messages": [{"role": "user", "content": f"A very long answer, please ({cid})."}],
            "max_tokens": max_tokens, "stream": True}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}")
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen >= events:
                            break  # leaving both context managers closes the connection mid-stream
        out["dropped"] += 1
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")


async def run_hangups(url: str, clients: int, max_tokens: int) -> dict:
    out = {"dropped": 0, "errors": []}
    await asyncio.gather(*(hang_up(url, c, 3, max_tokens, out) for c in range(clients)))
    return out


# --------------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a small random model, built here)")
    ap.add_argument("--clients", default="16,64", help="concurrent streaming clients, one run per count (1,2,...)")
    ap.add_argument("--requests", type=int, default=4, help="streamed requests per client (one after another)")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each phase-1 request")
    ap.add_argument("--max-concurrency", type=int, default=64, help="the server's --max-concurrency")
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own)")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--timeout", type=float, default=150.0, help="deadline of each phase, seconds")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    tmp = tempfile.TemporaryDirectory(prefix="pocketgpt-load-")
    ckpt = Path(args.ckpt) if args.ckpt else build_checkpoint(Path(tmp.name) / "load-model", args.n_layer,
                                                              args.n_embd, block_size=256)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("POCKETGPT_API_KEY", None)
    log = open(Path(tmp.name) / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "pocketgpt", "serve", "--ckpt", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
         "--max-concurrency", str(args.max_concurrency), "--max-queue", str(max(256, 2 * max(counts))),
         *(["--threads", str(args.threads)] if args.threads else []),
         "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failures = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        print(f"server: pid {server.pid}, {url}, --max-concurrency {args.max_concurrency}, model {ckpt.name} "
              f"({args.n_layer} layers, {args.n_embd} wide)")

        def within(coro):
            return asyncio.run(asyncio.wait_for(coro, timeout=args.timeout))

        within(run_load(url, max(counts), 1, 8))  # warm up (first allocations of full batches), then the baseline
        baseline = rss_mb(server.pid)

        single = within(run_load(url, 1, args.requests, args.max_tokens))
        one = single["tokens"] / single["seconds"]
        print(f"one client alone: {one:.0f} tokens/s, TTFT p50 {statistics.median(single['ttft']) * 1e3:.0f} ms")
        goals, peak = [], baseline
        for clients in counts:
            load = within(run_load(url, clients, args.requests, args.max_tokens))
            tps, p99 = load["tokens"] / load["seconds"], pct(load["ttft"], 99)
            peak = max(peak, rss_mb(server.pid))
            print(f"{clients} streaming clients x {args.requests} requests (max_tokens {args.max_tokens}): "
                  f"{len(load['errors'])} errors, {load['seconds']:.1f} s")
            print(f"  time to first token: p50 {pct(load['ttft'], 50) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
            print(f"  aggregate: {tps:.0f} tokens/s ({load['tokens']} tokens) = {tps / one:.2f}x one client alone")
            goals.append(f"{clients} clients: {tps / one:.1f}x one client (goal >= 8x) {'✔' if tps >= 8 * one else '✘'}")
            if clients == 16:
                goals.append(f"16 clients: p99 TTFT {p99:.2f} s (goal <= 1 s) {'✔' if p99 <= 1 else '✘'}")
            if load["errors"]:
                failures.append(f"{len(load['errors'])} errors with {clients} clients, e.g. {load['errors'][0]}")
        print("goals (issue 17): " + "; ".join(goals))

        hang = within(run_hangups(url, max(counts), max_tokens=200))
        t0 = time.perf_counter()
        while True:
            h = httpx.get(url + "/health", timeout=5).json()
            if h["running"] == 0 and h["queued"] == 0:
                break
            if time.perf_counter() - t0 > 30:
                failures.append(f"after the disconnects the server still reports {h}")
                break
            time.sleep(0.02)
        drained = time.perf_counter() - t0
        follow = httpx.post(url + "/v1/chat/completions", timeout=60,
                            json={"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 8})
        ok = follow.status_code == 200 and follow.json()["choices"][0]["message"]["role"] == "assistant"
        time.sleep(0.5)
        after = rss_mb(server.pid)
        print(f"{max(counts)} clients disconnecting mid-stream: {hang['dropped']} dropped, {len(hang['errors'])} "
              f"errors; slots free {drained * 1e3:.0f} ms after the last hang-up; follow-up request: "
              f"{'200 OK' if ok else f'FAILED ({follow.status_code})'}")
        print(f"server RSS: baseline (after warm-up) {baseline:.0f} MiB, after load {peak:.0f} MiB, "
              f"after disconnects {after:.0f} MiB "
              f"({after - baseline:+.0f} MiB)")
        if hang["errors"]:
            failures.append(f"{len(hang['errors'])} errors while hanging up, e.g. {hang['errors'][0]}")
        if not ok:
            failures.append(f"follow-up request failed: {follow.status_code} {follow.text[:200]}")
        if after > baseline * 1.10 + 20:
            failures.append(f"RSS did not return to baseline ({baseline:.0f} → {after:.0f} MiB)")
    except asyncio.TimeoutError:
        failures.append(f"a phase ran past --timeout {args.timeout:.0f} s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        tmp.cleanup()
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
