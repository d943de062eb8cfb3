"""``pocketgpt export``: a checkpoint as a Hugging Face directory (GPT2LMHeadModel or LlamaForCausalLM)."""

from __future__ import annotations

from pathlib import Path


def configure_cli(name, p):
    p.add_argument("ckpt", help="pocketgpt checkpoint directory")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format (hf = Hugging Face transformers)")
    p.add_argument("--arch", default="auto", choices=["auto", "gpt2", "llama"],
                   help="auto: learned positions → GPT-2, rope → Llama")
    p.set_defaults(func=run)


def run(args) -> int:
    from .hf import export_hf
    from .model import GPT

    model = GPT.from_pretrained(args.ckpt)
    tok = Path(args.ckpt) / "tokenizer"
    arch = export_hf(model, args.out, args.arch, tokenizer_dir=tok if tok.is_dir() else None)
    print(f"wrote {arch} to {args.out}")
    return 0
