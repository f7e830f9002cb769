"""Writes training shards as the imagefolder that diffusers' example trainers read (the peer of
`compare_peer.py`): one PNG per training sample and `metadata.jsonl` with its caption in `text`.

    python benchmarks/peer_imagefolder.py work/data/synthetic /tmp/imagefolder64

The peer then gets `--train_data_dir OUT --caption_column text`: the same images and captions as ours.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_ds.data.reader import iter_dataset  # noqa: E402


def write_imagefolder(shards: str | Path, out: str | Path, split: str = "train") -> int:
    """Returns the number of images written; refuses a non-empty OUT so no other set is mixed in."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pass a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(iter_dataset(shards, splits=(split,))):
        name = f"{i:06d}.png"
        (out / name).write_bytes(sample["image"])
        lines.append(json.dumps({"file_name": name, "text": sample["caption"] or ""}))
    if not lines:
        raise ValueError(f"{shards} has no {split} samples.")
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards", help="training shards (`defect-ds prepare ...`)")
    p.add_argument("out", help="new folder for the images and metadata.jsonl")
    p.add_argument("--split", default="train", help="which split of the shards (default train)")
    args = p.parse_args(argv)
    try:
        n = write_imagefolder(args.shards, args.out, args.split)
    except (ValueError, FileNotFoundError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images and metadata.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
