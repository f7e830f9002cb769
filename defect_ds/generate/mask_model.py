"""A small generative model of defect masks, trained from the few shots' masks: `--masks learned`.

    defect-ds train-masks work/data/shots work/mask-model --resolution-px 64

One tiny class-conditional DDPM (diffusers' UNet2DModel over 1-channel masks, one class per defect
type) learns the shapes of each type's real masks. Few shots suffice because it trains on a bank of
their augmentations (rotated, scaled, flipped, elastically deformed: `masks.augment_mask`), each
centred in the frame: the model learns shape, and generation places the shape on the object
(`masks.place_on_object`), as it places augmented masks. A sample is thresholded at 0.5, so it is
exactly 0/1. About a minute per thousand steps at 32 px on one CPU core; a few minutes at 64 px.

The folder holds `mask_model.safetensors` (the UNet's weights) and `mask_model.json` (resolution,
defect types in class order, the UNet's config, the training settings).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from defect_ds.data.masks import augment_mask
from defect_ds.data.reader import iter_dataset, load_mask_pool
from defect_ds.utils.files import atomic_folder

WEIGHTS_FILE = "mask_model.safetensors"
META_FILE = "mask_model.json"
TRAIN_TIMESTEPS = 200  # short schedule: masks are simple, and sampling stays fast
BETA_SCHEDULE = "squaredcos_cap_v2"  # cosine: pure noise at the last of only 200 steps (linear is not)
# the model predicts the clean mask: well conditioned near pure noise, where recovering it from a
# predicted epsilon divides by ~0, and a clean mask is what a 0.5 threshold wants
PREDICTION_TYPE = "sample"
SAMPLE_STEPS = 25  # DDIM steps per drawn mask
BANK_PER_TYPE = 128  # augmented masks per defect type drawn once before training


def unet_config(resolution_px: int, num_types: int) -> dict:
    """A UNet of about 0.2M parameters; three levels so a 64 px mask is seen at 16 px."""
    return {"sample_size": resolution_px, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
            "block_out_channels": [16, 32, 32], "down_block_types": ["DownBlock2D"] * 3,
            "up_block_types": ["UpBlock2D"] * 3, "norm_num_groups": 8, "num_class_embeds": num_types}


def centred(shape: np.ndarray, size: int) -> np.ndarray:
    """A cropped 0/1 shape in the middle of a size x size frame (shrunk by nearest when larger)."""
    from PIL import Image

    h, w = shape.shape
    if h > size or w > size:
        f = size / max(h, w)
        shape = (np.asarray(Image.fromarray(shape * 255).resize((max(1, int(w * f)), max(1, int(h * f))),
                                                                Image.NEAREST)) > 127).astype(np.uint8)
        h, w = shape.shape
    out = np.zeros((size, size), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = shape
    return out


def shot_masks(data: str, resolution_px: int, defect_types: list[str] | None) -> dict[str, list[np.ndarray]]:
    """The non-empty masks per defect type; a type among the shots (or asked for) with none is an error."""
    present = sorted({s["meta"].get("defect_type", "") for s in iter_dataset(data)} - {"", "good"})
    wanted = defect_types or present
    if not wanted:
        raise ValueError(f"{data} holds no defect samples (only good images or none); train-masks learns the "
                         "shapes of defect masks, so pass the few shots of defects with their masks.")
    pool = load_mask_pool("augmented", data, resolution_px)  # never raises on an empty type: named here
    for t in wanted:
        if not pool.get(t):
            raise ValueError(f"Defect type {t!r} has no non-empty mask among the shots in {data} (types with "
                             f"masks: {', '.join(sorted(pool)) or 'none'}); add a shot of it with its mask or "
                             "leave it out with --defect-types.")
    return {t: [m for m, _, _ in pool[t]] for t in wanted}


def train_mask_model(data: str, out_dir: str | Path, *, resolution_px: int = 64, steps: int = 1500,
                     batch_size: int = 16, learning_rate: float = 2e-3, seed: int = 0,
                     defect_types: list[str] | None = None, log_every: int = 100,
                     bank_per_type: int = BANK_PER_TYPE) -> Path:
    """Trains the mask model on augmentations of the shots' masks and writes it to out_dir."""
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import save_file

    masks = shot_masks(data, resolution_px, defect_types)
    types = sorted(masks)
    rng = np.random.default_rng(seed)
    bank, labels = [], []
    for label, t in enumerate(types):
        for i in range(bank_per_type):
            shape, _ = augment_mask(masks[t][i % len(masks[t])], rng)
            bank.append(centred(shape, resolution_px))
            labels.append(label)
    x_all = torch.from_numpy(np.stack(bank)).float()[:, None] * 2 - 1  # masks in [-1, 1]
    y_all = torch.tensor(labels)
    torch.manual_seed(seed)
    config = unet_config(resolution_px, len(types))
    unet = UNet2DModel(**config)
    scheduler = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE,
                              prediction_type=PREDICTION_TYPE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    lr = one_cycle(optimizer, learning_rate, steps)
    g = torch.Generator().manual_seed(seed)
    start, running, counted = time.time(), 0.0, 0
    for step in range(1, steps + 1):
        index = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x0, y = x_all[index], y_all[index]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch_size,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
        if log_every:
            running, counted = running + loss.item(), counted + 1  # a sync point, only when logging
            if step % log_every == 0 or step == steps:
                print(f"train-masks: step {step}/{steps} loss {running / counted:.4f} ({time.time() - start:.0f}s)")
                running, counted = 0.0, 0
    meta = {"resolution_px": resolution_px, "defect_types": types, "unet": config,
            "train_timesteps": TRAIN_TIMESTEPS, "beta_schedule": BETA_SCHEDULE,
            "prediction_type": PREDICTION_TYPE, "steps": steps, "batch_size": batch_size, "seed": seed,
            "shots": str(Path(data).resolve()), "masks_per_type": {t: len(masks[t]) for t in types}}
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def one_cycle(optimizer: torch.optim.Optimizer, learning_rate: float, steps: int):
    """Warm-up over 5% of the steps, then cosine decay (torch's OneCycleLR). Its warm-up must span at least
    two steps (at 20 steps, 5% is one and the schedule divides by zero), so short runs warm up over two;
    runs under three steps have no room for either phase and stay at OneCycleLR's starting rate (1/25 of the
    peak), as they did before it divided by zero."""
    if steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / 25)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                               pct_start=max(0.05, 2 / steps))


class MaskModel:
    """A loaded mask model: `sample(defect_type, rng)` draws one (R, R) uint8 0/1 mask, seeded by rng."""

    def __init__(self, unet, meta: dict):
        from diffusers import DDIMScheduler

        self.unet, self.meta = unet.eval(), meta
        self.types = list(meta["defect_types"])
        self.resolution_px = int(meta["resolution_px"])
        self.scheduler = DDIMScheduler(num_train_timesteps=int(meta["train_timesteps"]),
                                       beta_schedule=meta.get("beta_schedule", BETA_SCHEDULE),
                                       prediction_type=meta.get("prediction_type", PREDICTION_TYPE))
        self.scheduler.set_timesteps(SAMPLE_STEPS)

    @torch.no_grad()
    def sample(self, defect_type: str, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution_px
        label = torch.tensor([self.types.index(defect_type)])
        for _ in range(4):  # a rare empty draw is drawn again, from the same rng
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))
            x = torch.randn((1, 1, r, r), generator=g)
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self.unet(x, t, class_labels=label).sample, t, x).prev_sample
            mask = (x[0, 0].numpy() > 0).astype(np.uint8)  # 0.5 on the [0, 1] scale
            if mask.any():
                return mask
        raise ValueError(f"The mask model drew only empty masks of {defect_type!r}; train it longer "
                         "(`defect-ds train-masks ... --steps`).")


def load_mask_model(path: str | Path, resolution_px: int, defect_types: list[str]) -> MaskModel:
    """The model of a train-masks folder, checked against the generation's resolution and defect types."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"The mask model {folder} holds no {META_FILE} and {WEIGHTS_FILE}; make one with "
                                "`defect-ds train-masks DATA DIR`.")
    meta = _read_meta(folder / META_FILE)
    if int(meta["resolution_px"]) != resolution_px:
        raise ValueError(f"The mask model {folder} draws {meta['resolution_px']} px masks but generation is at "
                         f"{resolution_px} px; train one with `defect-ds train-masks DATA DIR --resolution-px "
                         f"{resolution_px}` or generate at {meta['resolution_px']} px.")
    missing = [t for t in defect_types if t not in meta["defect_types"]]
    if missing:
        raise ValueError(f"The mask model {folder} has no masks of defect type {missing[0]!r} (it knows "
                         f"{', '.join(meta['defect_types'])}); train it on shots of that type or leave the type out of "
                         "the defect types to generate.")
    unet = UNet2DModel(**meta["unet"])
    weights = folder / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error type: a truncated or overwritten file
        raise ValueError(f"The mask model {weights} is not readable ({e}); train it again with `defect-ds "
                         "train-masks DATA DIR`.") from None
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        key = next((k for k in expected if got.get(k) != expected[k]), None) or next(k for k in got if k not in expected)
        raise ValueError(f"The mask model {weights} does not fit the UNet its {META_FILE} describes ({key}: expected "
                         f"{expected.get(key, 'no such weight')}, found {got.get(key, 'none')}); train it again "
                         "with `defect-ds train-masks DATA DIR`.")
    unet.load_state_dict(state)
    return MaskModel(unet, meta)


def _read_meta(path: Path) -> dict:
    """mask_model.json, checked for the fields loading needs."""
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"The mask model {path} is not readable JSON ({e}); train it again with `defect-ds "
                         "train-masks DATA DIR`.") from None
    fields = ("resolution_px", "defect_types", "unet", "train_timesteps")
    if not isinstance(meta, dict) or any(f not in meta for f in fields) or not isinstance(meta["unet"], dict) \
            or not isinstance(meta["defect_types"], list):
        raise ValueError(f"The mask model {path} lacks the fields {', '.join(fields)} (a list of defect types and a "
                         "UNet config); train it again with `defect-ds train-masks DATA DIR`.")
    return meta


# ---- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.resolution_px < 16 or args.resolution_px % 8:
        raise ValueError(f"--resolution-px={args.resolution_px} is invalid: use a multiple of 8 from 16, such as 64.")
    if min(args.steps, args.batch_size) < 1:
        raise ValueError("--steps and --batch-size must be 1 or more.")
    if args.threads:
        torch.set_num_threads(args.threads)
    types = args.defect_types.split(",") if args.defect_types else None
    out = train_mask_model(args.data, args.out_dir, resolution_px=args.resolution_px, steps=args.steps,
                           batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                           defect_types=types, log_every=0 if args.quiet else 100)
    print(f"train-masks: wrote {out} ({', '.join(json.loads((out / META_FILE).read_text())['defect_types'])})")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-masks", help="train a small mask model per defect type for `generate --masks learned`",
                       description=__doc__.splitlines()[0])
    p.add_argument("data", help="the few shots: a data set (shards) whose non-empty masks to learn, per defect type")
    p.add_argument("out_dir", help="folder to write (mask_model.safetensors + mask_model.json)")
    p.add_argument("--resolution-px", type=int, default=64, help="mask size; must be the generation's")
    p.add_argument("--defect-types", help="comma-separated (default: every defect type of the shots)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="cap torch's CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no loss lines")
    p.set_defaults(func=run)
