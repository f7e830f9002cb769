"""The `defect-ds` command: one subcommand per job, each defined by the module that does the work.

    defect-ds --help
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module -> function(subparsers) that adds its subcommand(s); each sets `func(args) -> int | None`.
COMMANDS = [
    ("defect_ds.tiny_model_cli", "add_command"),
    ("defect_ds.data.prepare", "add_command"),
    ("defect_ds.generation", "add_command"),
    ("defect_ds.evaluation", "add_command"),
    ("defect_ds.bench", "add_command"),
    ("defect_ds.pretrain.cli", "add_command"),
    ("defect_ds.downstream.cli", "add_command"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defect-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name, function in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # a subcommand whose module is not part of this build
        getattr(module, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # user-facing errors are one sentence; a traceback would bury it
        if not getattr(e, "user_facing", True):
            raise
        print(f"defect-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
