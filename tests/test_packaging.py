"""Packaging: `serve` (fastapi, uvicorn), `plots` (matplotlib), `gguf` and `eval` (lm-eval) are extras. Without them
`pocketgpt serve` / `export --format gguf` / `eval --tasks` say in one line how to install the extra, and training goes on without plots after one warning line (the missing packages
are simulated in a child process by a ``sys.modules`` block)."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT

tomllib = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli")  # tomli: a core dependency on 3.10


def run_without(modules, *argv):
    """``pocketgpt ARGV`` in a fresh interpreter where importing any of ``modules`` fails as if not installed."""
    code = ("import sys\nfor m in sys.argv[1].split(','): sys.modules[m] = None\n"
            "from pocketgpt.cli import main\nsys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, ",".join(modules), *map(str, argv)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"})


def test_extras_are_declared_and_make_test_installs_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert not any(name in core for name in ("fastapi", "uvicorn", "matplotlib", "gguf", "lm-eval"))
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["serve"]] == ["fastapi", "uvicorn"]
    assert [d.split(">")[0] for d in extras["plots"]] == ["matplotlib"]
    assert [d.split(">")[0] for d in extras["gguf"] + extras["eval"]] == ["gguf", "lm-eval"]
    assert {"pocketgpt[serve,plots]", "pocketgpt[gguf,eval]"} <= set(extras["test"])  # what `make test` installs
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    assert entry == {"pocketgpt": "pocketgpt.evaluate:PocketGPTLM"}
    assert 'pip install -q -e ".[test]"' in (ROOT / "Makefile").read_text()


def test_serve_without_the_extra_says_how_to_install_it(tmp_path):
    for missing in ("fastapi", "uvicorn"):
        p = run_without([missing], "serve", "--ckpt", tmp_path)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr == f"pocketgpt serve: error: {missing} is not installed: pip install 'pocketgpt[serve]'\n"


def test_gguf_and_lm_eval_without_their_extras_say_how_to_install_them(tmp_path):
    p = run_without(["gguf"], "export", "--format", "gguf", tmp_path, tmp_path / "m.gguf")
    assert (p.returncode, p.stderr) == (2, "pocketgpt export: error: gguf is not installed: pip install "
                                           "'pocketgpt[gguf]'\n")
    p = run_without(["lm_eval"], "eval", tmp_path, "--tasks", "hellaswag")
    assert (p.returncode, p.stderr) == (2, "pocketgpt eval: error: lm-eval is not installed: pip install "
                                           "'pocketgpt[eval]'\n")


def test_training_without_matplotlib_skips_plots_with_one_warning(tmp_path):
    ids = np.random.default_rng(0).integers(0, 20, 4000).astype(np.uint16)
    ids[:3600].tofile(tmp_path / "train.bin")
    ids[3600:].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 20,
                                                    "counts": {"train": 3600, "val": 400}}))
    (tmp_path / "c.toml").write_text(
        "[model]\nblock_size = 16\nn_layer = 1\nn_head = 2\nn_embd = 16\n\n[train]\nmax_steps = 6\nbatch_size = 4\n"
        'eval_interval = 2\neval_batches = 2\nlog_interval = 1\ndevice = "cpu"\ndtype = "fp32"\n\n'
        f'[data]\ndir = "{tmp_path}"\n')
    p = run_without(["matplotlib"], "pretrain", "--config", tmp_path / "c.toml", "--out", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "matplotlib" in line]
    assert warnings == ["warning: matplotlib is not installed, so no plots: pip install 'pocketgpt[plots]'"], p.stderr
    run = tmp_path / "run"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert len(evals) == 3 and (run / "ckpt" / "model.safetensors").is_file()  # three evaluations, each would plot
    assert not list(run.glob("*.png"))
