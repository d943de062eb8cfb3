"""The "hello world" of the seed tutorials: a 2-layer MLP that classifies 8x8 handwritten digits, in plain PyTorch.

    python examples/digits_mlp.py            # 30 epochs, a few seconds on a CPU
    python examples/digits_mlp.py --quick    # 10 epochs (what the tests run)

Data: scikit-learn's bundled digits (1,797 images of 8x8 pixels, 0..16; ``sklearn.datasets.load_digits``, no
download), a stratified 80/20 train/test split. Model: 64 → hidden (ReLU) → 10, cross-entropy, Adam, mini-batches.
Outputs in ``--out`` (default ``runs/examples/digits_mlp``): ``loss.png`` (train / test loss and test accuracy per
epoch), ``model/model.safetensors`` and ``results.json`` (test accuracy, per-epoch history).
Needs scikit-learn: ``pip install -e ".[examples]"``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A 2-layer MLP digit classifier on scikit-learn's bundled digits.")
    p.add_argument("--out", default="runs/examples/digits_mlp", help="output directory "
                   "(default runs/examples/digits_mlp)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 30; 10 quick)")
    p.add_argument("--quick", action="store_true", help="a short run for tests/CI (10 epochs)")
    p.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction (default 0.2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 10 if args.quick else 30
    return args


def check_args(args) -> None:
    from pocketgpt.errors import UserError

    for name in ("epochs", "hidden", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')}: must be a positive integer, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr: must be > 0, got {args.lr}")
    if not 0.0 < args.test_fraction < 1.0:
        raise UserError(f"--test-fraction: must be in (0, 1), got {args.test_fraction}")


def load_data(test_fraction: float, seed: int):
    """(x_train, y_train, x_test, y_test) float32 / int64 tensors, pixels scaled to [0, 1]."""
    import torch

    from pocketgpt.errors import UserError

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UserError("this example needs scikit-learn: pip install scikit-learn "
                        "(or pip install -e \".[examples]\")") from None
    digits = load_digits()
    x = digits.data.astype("float32") / 16.0  # (1797, 64)
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return tuple(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te))


def make_mlp(n_in: int, hidden: int, n_out: int):
    """The 2-layer MLP: Linear → ReLU → Linear (logits)."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def evaluate(model, x, y) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a whole set."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pocketgpt.io import atomic_write_bytes

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train loss")
    ax.plot(epochs, [h["test_loss"] for h in history], "o-", ms=3, label="test loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    acc.plot(epochs, [100 * h["test_acc"] for h in history], "s--", ms=3, color="tab:green", label="test accuracy")
    acc.set_ylabel("test accuracy (%)")
    lines = ax.get_legend_handles_labels()
    more = acc.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    ax.set_title(f"digits MLP: test accuracy {100 * history[-1]['test_acc']:.1f}% after {epochs[-1]} epochs")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from pocketgpt import runtime
    from pocketgpt.io import atomic_dir, write_json

    out = Path(args.out)
    runtime.seed_everything(args.seed)
    device = runtime.pick_device(args.device)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in load_data(args.test_fraction, args.seed))
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images of 8x8 pixels, 10 classes")

    model = make_mlp(x_tr.shape[1], args.hidden, 10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MLP 64 -> {args.hidden} -> 10 ({n_params:,} parameters), {args.epochs} epochs, batch {args.batch_size}, "
          f"Adam lr {args.lr}")

    g = torch.Generator().manual_seed(args.seed)
    history = []
    t0 = time.time()
    quiet = not sys.stderr.isatty() or bool(os.environ.get("CI"))
    for epoch in tqdm(range(1, args.epochs + 1), desc="epochs", file=sys.stderr, disable=quiet):
        model.train()
        order = torch.randperm(len(x_tr), generator=g).to(device)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        test_loss, test_acc = evaluate(model, x_te, y_te)
        history.append({"epoch": epoch, "train_loss": total / len(x_tr), "test_loss": test_loss, "test_acc": test_acc})
        if epoch == 1 or epoch % 5 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}: train loss {history[-1]['train_loss']:.4f}  test loss {test_loss:.4f}  "
                  f"test accuracy {100 * test_acc:.2f}%")
    seconds = time.time() - t0
    train_loss, train_acc = evaluate(model, x_tr, y_tr)

    plot(history, out / "loss.png")
    from safetensors.torch import save_model

    with atomic_dir(out / "model") as tmp:
        save_model(model, str(tmp / "model.safetensors"))
    write_json(out / "results.json", {"test_accuracy": history[-1]["test_acc"], "train_accuracy": train_acc,
                                      "epochs": args.epochs, "hidden": args.hidden, "params": n_params,
                                      "seconds": round(seconds, 2), "history": history})
    print(f"\ntest accuracy {100 * history[-1]['test_acc']:.2f}% (train {100 * train_acc:.2f}%) in {seconds:.1f}s")
    print(f"wrote {out / 'loss.png'}, {out / 'model' / 'model.safetensors'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a UserError (bad option, missing scikit-learn) is one line, not a traceback
        from pocketgpt.errors import UserError

        if isinstance(e, UserError):
            print(f"digits_mlp: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
