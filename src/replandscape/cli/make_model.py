"""``replandscape make-model OUT [--family llama|mistral] [--layers N --hidden D]``.

Saves a small randomly initialised causal LM and a byte-level BPE tokenizer that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads offline, for tests and the demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("make-model", help="save a tiny offline causal LM + tokenizer",
                            description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--family", choices=("llama", "mistral"), default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replandscape.config import ModelConfig
    from replandscape.models import build_tiny_model

    cfg = ModelConfig(name=Path(args.out).name, path=args.out, n_layers=args.layers,
                      hidden_size=args.hidden, tiny_intermediate_size=args.intermediate,
                      tiny_heads=args.heads, context_length=args.context)
    folder = build_tiny_model(Path(args.out), cfg, args.family, args.seed)
    print(f"model -> {folder}")
    return 0
