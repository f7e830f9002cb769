"""`defect-ds evaluate`: FID, KID and IS of generated against real defect images, plus mask and diversity scores.

    defect-ds evaluate work/gen --real work/data --inception-weights work/weights-inception-2015-12-05-6726825d.pth

The scores are computed in `metrics.py`; the pictures and the markdown report come from `report.py`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from defect_ds.evaluate.metrics import ENV_CACHE, ENV_INCEPTION, ENV_LPIPS, evaluate

# ---- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if min(args.batch_size, args.kid_subset_size, args.kid_subsets, args.isc_splits) < 1:
        raise ValueError("--batch-size, --kid-subset-size, --kid-subsets and --isc-splits must be 1 or more.")
    splits = tuple(args.real_split.split(",")) if args.real_split else None
    out_dir = args.out or str(Path(args.generated) / "eval")
    report = evaluate(args.generated, args.real, out_dir, inception_weights=args.inception_weights,
                      lpips_weights=args.lpips_weights, cache_dir=args.cache_dir, real_splits=splits,
                      resolution_px=args.resolution_px, batch_size=args.batch_size,
                      kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                      isc_splits=args.isc_splits, device=args.device)
    o = report["overall"]
    print(f"evaluate: overall FID {o['fid']}, KID {o['kid_mean']}, IS {o['is_mean']}; "
          f"report in {Path(out_dir) / 'report.md'}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="FID/KID/IS, mask localisation and diversity of generated images",
                       description=__doc__.splitlines()[0])
    p.add_argument("generated", help="a `defect-ds generate` output folder (or shards, or a folder of images)")
    p.add_argument("--real", required=True, help="real images: a shards folder (the training data), a "
                   "generated-style folder, or a folder of images with one subfolder per defect type")
    p.add_argument("--real-split", default="", help="comma-separated shard splits of --real (default: all)")
    p.add_argument("--out", help="report folder (default: GENERATED/eval)")
    p.add_argument("--inception-weights", help=f"torch-fidelity Inception weights file (or ${ENV_INCEPTION})")
    p.add_argument("--lpips-weights", help="folder with weights-vgg16-lpips.pth and vgg16-397923af.pth for "
                   f"IC-LPIPS (or ${ENV_LPIPS}); without it IC-LPIPS is reported unavailable")
    p.add_argument("--cache-dir", help=f"feature cache (or ${ENV_CACHE}; default ~/.cache/defect_ds/fidelity)")
    p.add_argument("--resolution-px", type=int, default=0, help="resize every image to this square size "
                   "(default: the generated images' size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="lowered to the smaller set's size")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--isc-splits", type=int, default=10, help="lowered to the number of generated images")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=run)
