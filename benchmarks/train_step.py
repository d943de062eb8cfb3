"""Training-step throughput: pocketgpt vs transformers.GPT2LMHeadModel, same shapes, same process.

Times forward + backward + AdamW step on the nanoGPT Shakespeare-char shapes (6 layers, 6 heads, 384 dims,
context 256, vocab 65, batch 16) in fp32 and in bf16 autocast, and prints tokens/s, MFU and the ratio. MFU is
against this machine's matmul roofline, measured first (best of 20 products of 1024 x 1024 matrices per dtype).
The two models are timed in alternating rounds and each keeps its best round, so that load from other processes
hurts both alike (on a shared machine absolute figures are pessimistic; the ratio is the figure to read).

    python benchmarks/train_step.py                 # ~2 minutes on 2 cores
    python benchmarks/train_step.py --steps 10 --rounds 5 --optim fused
    python benchmarks/train_step.py --optim-only    # AdamW fused vs foreach vs for-loop (and Muon) on this device
"""

from __future__ import annotations

import argparse
import time

import torch  # noqa: E402

from pocketgpt import GPT, GPTConfig  # noqa: E402


def make_pocketgpt(a) -> torch.nn.Module:
    cfg = GPTConfig(vocab_size=a.vocab, block_size=a.ctx, n_layer=a.layers, n_head=a.heads, n_embd=a.dim,
                    dropout=0.0, bias=True)
    return GPT(cfg)


def make_transformers(a) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.ctx, n_layer=a.layers, n_head=a.heads, n_embd=a.dim,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    try:
        return GPT2LMHeadModel(cfg, attn_implementation="sdpa")
    except TypeError:
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)


def step_fn(kind: str, model, opt, x, y, dtype):
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with ctx:
        if kind == "pocketgpt":
            _, loss = model(x, y)
        else:
            loss = model(input_ids=x, labels=x).loss  # shifts internally: the same next-token task
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(kind, model, opt, batch, dtype, steps: int) -> float:
    x, y = batch
    t = time.perf_counter()
    for _ in range(steps):
        step_fn(kind, model, opt, x, y, dtype)
    return (time.perf_counter() - t) / steps


def matmul_roofline(dtype, n: int = 1024, reps: int = 20) -> float:
    """This machine's matmul FLOP/s in ``dtype``: the best of ``reps`` products of two n x n matrices."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):  # two warm-up products
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_opt(model, impl: str):
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kw)


def optim_only(a) -> None:
    model = make_pocketgpt(a)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    print(f"AdamW step alone on {model.num_params() / 1e6:.1f}M parameters:")
    for impl in ("foreach", "for-loop", "fused"):
        opt = make_opt(model, impl)
        for _ in range(3):
            opt.step()
        t = time.perf_counter()
        for _ in range(20):
            opt.step()
        print(f"  {impl:9s} {1e3 * (time.perf_counter() - t) / 20:7.2f} ms")
    if hasattr(torch.optim, "Muon"):  # what [train] optimizer = "muon" steps: Muon on the hidden matrices + AdamW
        from pocketgpt.train.trainer import _hidden_matrices

        hidden = _hidden_matrices(model)
        opts = [torch.optim.Muon(list(hidden), lr=0.02),
                torch.optim.AdamW([p for p in model.parameters() if p not in hidden], lr=1e-4, fused=True)]
        for i in range(23):
            if i == 3:
                t = time.perf_counter()
            for o in opts:
                o.step()
        print(f"  muon + fused AdamW {1e3 * (time.perf_counter() - t) / 20:7.2f} ms "
              f"({len(hidden)} matrices through Newton-Schulz)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--optim", default="fused", choices=["fused", "foreach", "for-loop"])
    ap.add_argument("--optim-only", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.optim_only:
        optim_only(a)
        return

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.ctx), generator=g)
    y = torch.roll(x, -1, dims=1)
    models = {"pocketgpt": make_pocketgpt(a), "transformers": make_transformers(a)}
    fpt = models["pocketgpt"].flops_per_token(a.ctx)
    print(f"shapes: {a.layers}L {a.heads}H {a.dim}d, ctx {a.ctx}, vocab {a.vocab}, batch {a.batch}; "
          f"{models['pocketgpt'].num_params() / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token; "
          f"{torch.get_num_threads()} threads; AdamW {a.optim}")
    for name in a.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        opts = {k: make_opt(m, a.optim) for k, m in models.items()}
        best = {k: float("inf") for k in models}
        for k, m in models.items():  # warm up (allocator, oneDNN primitives)
            time_steps(k, m, opts[k], (x, y), dtype, 2)
        for _ in range(a.rounds):
            for k, m in models.items():
                best[k] = min(best[k], time_steps(k, m, opts[k], (x, y), dtype, a.steps))
        peak = matmul_roofline(dtype)
        print(f"  {name:5s} measured matmul roofline {peak / 1e9:,.0f} GFLOP/s")
        tok = {k: a.batch * a.ctx / t for k, t in best.items()}
        for k in models:
            print(f"  {name:5s} {k:13s} {tok[k]:9,.0f} tok/s   {1e3 * best[k]:8.1f} ms/step   "
                  f"MFU {100 * fpt * tok[k] / peak:5.1f}%")
        print(f"  {name:5s} ratio pocketgpt / transformers: {tok['pocketgpt'] / tok['transformers']:.2f}x")


if __name__ == "__main__":
    main()
