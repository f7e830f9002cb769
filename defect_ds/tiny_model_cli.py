"""`defect-ds make-tiny-model DIR [--arch tiny|sd15]`: a random-weight SD folder, offline."""
from __future__ import annotations

import argparse

from defect_ds.tiny_model import ARCHS, make_model_folder


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a random-weight Stable Diffusion folder (offline)")
    p.add_argument("out_dir", help="folder to create; must not hold a model already")
    p.add_argument("--arch", choices=ARCHS, default="tiny",
                   help="tiny (CPU tests, the default) or sd15 (real SD 1.5 shapes for speed work)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = make_model_folder(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"wrote {args.arch} model to {out}")
    return 0
