"""The `defect-ds` command: one subcommand per job, each defined by the area that does the work.

    defect-ds --help
"""
from __future__ import annotations

import argparse
import sys

from defect_ds.config import split_overrides
from defect_ds.data import mvtec, prepare
from defect_ds.downstream import cli as downstream_cli
from defect_ds.evaluate import cli as evaluate_cli
from defect_ds.generate import cli as generate_cli
from defect_ds.generate import mask_model
from defect_ds.model import tiny
from defect_ds.perf import sweep
from defect_ds.pretrain import cli as pretrain_cli
from defect_ds.utils.files import DiskFullError, is_disk_full

# Each adds its subcommand(s) to the parser; each subcommand sets `func(args) -> int | None`.
COMMANDS = (tiny.add_command, prepare.add_command, pretrain_cli.add_command, generate_cli.add_command,
            mvtec.add_command, mask_model.add_command, evaluate_cli.add_command, downstream_cli.add_command,
            sweep.add_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defect-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def parse_command(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; --section.field=value overrides go to `args.overrides` of a command that
    reads a config (`config.add_config_argument`), and are refused by any other."""
    overrides, rest = split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if overrides:
        args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_command(sys.argv[1:] if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # user-facing errors are one sentence; a traceback would bury it
        if not getattr(e, "user_facing", True):
            raise
        print(f"defect-ds {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        # the atomic writers name the file (DiskFullError); any other write names what the OS said
        where = getattr(e, "filename", None)
        message = str(e) if isinstance(e, DiskFullError) else (
            f"No space left on the disk{f' holding {where}' if where else ''}; free space and rerun.")
        print(f"defect-ds {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
