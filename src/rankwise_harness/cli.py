"""The ``rankwise`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rankwise", description="Fine-tune models with rankwise adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LoRA on the packaged MiniLM, trained on Rotten Tomatoes snippets (CPU, ~1 min)")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
