"""Command line: ``python -m ckpt_compile --help``."""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ckpt_compile",
        description="Activation checkpointing for PyTorch: demos and diagnostics.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a small model with and without checkpointing and compare")
    demo.add_argument("--steps", type=int, default=5, help="training steps per variant (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        if args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        from ckpt_compile._demo import run_eager_demo

        run_eager_demo(args.steps)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
