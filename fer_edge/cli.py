"""The ``fer-edge`` command line.

Every sub-command is a function ``cmd_<name>(args) -> int`` registered in
``COMMANDS``; errors the user can fix are raised as ``fer_edge.UserError`` and
printed as one line on stderr with a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from fer_edge import UserError, __version__


def cmd_info(args: argparse.Namespace) -> int:
    from fer_edge import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_text(data))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show versions, compiled kernels, runtimes and GPU")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)


# name -> function adding the sub-parser; one place lists every command.
COMMANDS = {
    "info": _add_info,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-edge",
        description="Facial-expression recognition: train, merge, convert for Jetson/Android, run on device.",
    )
    parser.add_argument("--version", action="version", version=f"fer-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"fer-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fer-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
