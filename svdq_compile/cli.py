"""``svdq`` command line: each subcommand lives in ``svdq_compile/commands/<name>.py``.

A command module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

__all__ = ["main"]

COMMANDS = ("demo", "bench", "export", "quantize", "generate", "import_")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="svdq", description="SVDQuant 4-bit compiler for diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"svdq_compile.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("svdq_compile.commands"):
                continue  # command not shipped in this build
            raise
        mod.add_parser(sub)
        modules[name] = mod
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
