"""Writes a Stable-Diffusion-format model folder with random weights, fully offline.

    defect-ds make-tiny-model work/tiny-sd            # tiny: a CPU training step in well under a second
    defect-ds make-tiny-model work/sd15 --arch sd15   # the real SD 1.5 architecture, random weights

The folder has the real diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/), so every code path is the one a downloaded SD 1.5 folder takes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from defect_ds.utils.files import atomic_folder

# Configs of runwayml/stable-diffusion-v1-5, written out so nothing is fetched.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
    num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# Tiny: the same block types (attention at two grids, 8x VAE downsampling), a fraction of the width.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 16, 32, 32), norm_num_groups=8, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
)
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)
ARCHS = ("tiny", "sd15")

# Words the offline tokenizer merges into whole tokens; anything else falls back to byte pieces.
_WORDS = """a an the of with on in and photo picture close up image macro industrial part object surface
pill capsule tablet screw bolt head nut metal plastic wood fabric tile texture board circuit solar cell
defect defects scratch scratches crack cracks contamination spot spots stain dent hole broken cut
vertical horizontal diagonal small large thin thick long short dark light white black red brown grey
good clean normal anomaly damaged""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _write_clip_vocab(folder: Path) -> None:
    """A CLIP-style byte-level BPE vocabulary (vocab.json + merges.txt) built from a fixed word list."""
    chars = list(_bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            merged = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                vocab_tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_tokenizer():
    """An offline CLIPTokenizer (77 tokens, lower-cased, accepts added tokens)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_vocab(Path(tmp))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
        return CLIPTokenizer.from_pretrained(tmp)


def model_configs(arch: str) -> tuple[dict, dict, dict]:
    """(unet, vae, text encoder) constructor kwargs for an architecture name."""
    if arch == "sd15":
        return SD15_UNET, SD15_VAE, SD15_TEXT
    if arch == "tiny":
        return TINY_UNET, TINY_VAE, TINY_TEXT
    raise ValueError(f"Unknown architecture {arch!r}: use one of {', '.join(ARCHS)}.")


def make_model_folder(out_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Writes a diffusers StableDiffusionPipeline folder with random weights; returns its path."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        raise FileExistsError(f"{out_dir} already holds a model (model_index.json); "
                              "choose another folder or delete it first.")
    unet_cfg, vae_cfg, text_cfg = model_configs(arch)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_cfg = dict(text_cfg)
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **text_cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_cfg), scheduler=DDPMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(out_dir) as tmp:  # a folder with model_index.json is always complete
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir


# ---- the command --------------------------------------------------------------------------------
def add_command(sub: argparse._SubParsersAction) -> None:
    """Adds `defect-ds make-tiny-model DIR [--arch tiny|sd15]`."""
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
