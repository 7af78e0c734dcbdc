"""Command line: a thin layer over the library. Nothing in ichscan imports this package.

Each module in ``ichscan.cli`` that defines ``register(subparsers)`` adds one subcommand; the
registered function receives the parsed arguments and returns an exit status. Modules import heavy
libraries (torch, matplotlib) inside their run functions so that ``ichscan inspect`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ichscan import __version__
from ichscan.errors import IchscanError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichscan",
        description="Intracranial hemorrhage on head CT. Research software, not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"ichscan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # A file name that is not UTF-8 prints with backslash escapes instead of ending a finished run with
    # UnicodeEncodeError (a terminal's stderr does this already; stdout and captured streams do not).
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except IchscanError as err:
        print(f"ichscan {args.command}: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `ichscan inspect --json | head`: the reader left; say nothing more.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"ichscan {args.command}: interrupted; finished outputs are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
