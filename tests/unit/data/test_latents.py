"""Precomputed latent shards: encoding with the tiny VAE, the shard format, and the load-time transform."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from defect_ds.config import DataConfig
from defect_ds.data.latents import _read_shard, encode_shards, transform_latent_sample
from defect_ds.data.transforms import transform_image_sample

RES = 64


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size: tuple[int, int]) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[10:30, 5:20] = 255  # left of centre: a flip moves it
    return Image.fromarray(mask)


SAMPLES = [  # key, defect type, split, image size (w, h)
    ("s0", "scratch", "train", (RES, RES)), ("s1", "crack", "train", (RES, RES)),
    ("s2", "good", "train", (96, RES)), ("s3", "scratch", "val", (RES, RES)), ("s4", "crack", "train", (RES, 80))]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    shards = {"train": [], "val": []}
    for split in ("train", "val"):
        name = f"{split}-000000.tar"
        counts: dict[str, int] = {}
        with wds.TarWriter(str(out / name)) as writer:
            for i, (key, defect, s, size) in enumerate(SAMPLES):
                if s != split:
                    continue
                writer.write({"__key__": key, "image.png": _png(_image(i, size)), "mask.png": _png(_mask(size)),
                              "caption.txt": f"a photo of a part with a {defect}".encode(),
                              "json": json.dumps({"category": "part", "defect_type": defect, "source": key,
                                                  "split": split, "size": list(size)}).encode()})
                counts[defect] = counts.get(defect, 0) + 1
        shards[split].append({"name": name, "samples": sum(counts.values()), "counts": counts})
    manifest = {"kind": "images", "defect_tokens": {"scratch": "<scratch>", "crack": "<crack>"},
                "counts": {s: {k: v for info in shards[s] for k, v in info["counts"].items()} for s in shards},
                "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def latent_shards(image_shards, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "lat"
    manifest = encode_shards(image_shards, out, tiny_model_dir, resolution_px=RES, batch_size=2, device="cpu",
                             text_embeddings=True)
    return out, manifest


def read_samples(folder) -> dict[str, dict]:
    return {s["__key__"]: s for name in sorted(p.name for p in folder.glob("*.tar"))
            for s in wds.WebDataset(str(folder / name), shardshuffle=False, empty_check=False)}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    return (AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval(),
            CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval(),
            CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer"))


def test_manifest_describes_latent_shards(latent_shards):
    out, manifest = latent_shards
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["kind"] == "latents" and on_disk["resolution_px"] == RES
    assert on_disk["scaling_factor"] == pytest.approx(0.18215)
    assert on_disk["defect_tokens"] == {"scratch": "<scratch>", "crack": "<crack>"}
    assert on_disk["counts"] == {"train": {"crack": 2, "good": 1, "scratch": 1}, "val": {"scratch": 1}}
    assert on_disk["latent_shape"] == [2, 4, RES // 8, RES // 8]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_stored_latents_are_the_vae_posterior_of_image_and_mirror(latent_shards, models):
    vae, _, _ = models
    samples = read_samples(latent_shards[0])
    assert set(samples) == {k for k, *_ in SAMPLES}
    pixels = torch.from_numpy(np.asarray(_image(0, (RES, RES)), np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        plain, mirror = vae.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist.mean
    stored = np.load(io.BytesIO(samples["s0"]["latent.npy"]))
    stored_flip = np.load(io.BytesIO(samples["s0"]["latent_hflip.npy"]))
    assert stored.shape == (2, 4, RES // 8, RES // 8) and stored.dtype == np.float16
    np.testing.assert_allclose(stored[0], plain.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(stored_flip[0], mirror.numpy(), atol=2e-3, rtol=2e-3)
    assert not np.allclose(stored_flip[0], stored[0][..., ::-1], atol=1e-2)  # the VAE is not flip-equivariant


def test_non_square_images_are_resized_and_centre_cropped(latent_shards):
    samples = read_samples(latent_shards[0])
    for key in ("s2", "s4"):
        mask = Image.open(io.BytesIO(samples[key]["mask.png"]))
        assert mask.size == (RES, RES)
    # s2 is 96x64: short side already 64, the crop drops 16 px on the left, so the mask moves left by 16
    mask = np.asarray(Image.open(io.BytesIO(samples["s2"]["mask.png"]))) >= 128
    assert mask[10:30, 0:4].all() and not mask[:, 4:].any()


def test_precomputed_latents_match_the_ones_the_trainer_encodes_on_the_fly(image_shards, latent_shards, models):
    """Latent shards encode exactly the pixels the loader gives the VAE (resized, centre-cropped, unflipped)."""
    vae, _, _ = models
    stored = read_samples(latent_shards[0])
    for raw in read_samples(image_shards).values():
        loaded = transform_image_sample(raw, DataConfig(resolution_px=RES), hflip=False, vflip=False, crop_at=None)
        with torch.no_grad():
            mean = vae.encode(loaded["pixel_values"][None]).latent_dist.mean[0]
        latent = np.load(io.BytesIO(stored[raw["__key__"]]["latent.npy"]))[0]
        np.testing.assert_allclose(latent, mean.numpy(), atol=2e-3, rtol=2e-3)
        mask = np.asarray(Image.open(io.BytesIO(stored[raw["__key__"]]["mask.png"]))) >= 128
        assert np.array_equal(mask, loaded["mask"][0].numpy().astype(bool))


@pytest.mark.parametrize("resolution_px", [RES, 40])
def test_latents_read_images_exactly_as_the_loader_does(image_shards, resolution_px):
    """Bit for bit, also where the short side is resized (40 px) and for non-square images."""
    cfg = DataConfig(resolution_px=resolution_px)
    raws = {raw["__key__"]: raw for raw in read_samples(image_shards).values()}
    read = [s for name in ("train-000000.tar", "val-000000.tar") for s in _read_shard(image_shards / name,
                                                                                    resolution_px)]
    assert sorted(s["key"] for s in read) == sorted(raws)
    for s in read:
        loaded = transform_image_sample(raws[s["key"]], cfg, hflip=False, vflip=False, crop_at=None)
        assert torch.equal(s["pixels"], loaded["pixel_values"])
        assert np.array_equal(np.asarray(s["mask"]) >= 128, loaded["mask"][0].numpy().astype(bool))


def test_text_embeddings_match_the_text_encoder(latent_shards, models):
    _, text_encoder, tokenizer = models
    sample = read_samples(latent_shards[0])["s1"]
    ids = tokenizer([sample["caption.txt"].decode()], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids)[0][0].numpy()
    np.testing.assert_allclose(np.load(io.BytesIO(sample["text_embeds.npy"])), expected, atol=5e-3, rtol=5e-3)


def test_transform_draws_from_the_stored_posterior(latent_shards):
    sample = read_samples(latent_shards[0])["s0"]
    cfg = DataConfig(resolution_px=RES)
    stored = torch.from_numpy(np.load(io.BytesIO(sample["latent.npy"])).astype(np.float32))
    out = transform_latent_sample(sample, cfg, flip=False, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(stored[0].shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["latents"], stored[0] + torch.exp(0.5 * stored[1]) * noise)
    assert out["latents"].dtype == torch.float32 and out["latents"].shape == (4, RES // 8, RES // 8)
    assert out["mask"].shape == (1, RES, RES) and out["mask"].dtype == torch.float32
    assert out["mask"][0, 10:30, 5:20].eq(1).all() and out["mask"].sum() == 20 * 15
    assert (out["caption"], out["defect_type"], out["key"]) == ("a photo of a part with a scratch", "scratch", "s0")
    assert out["text_embeds"].shape == (77, 32) and out["text_embeds"].dtype == torch.float32


def test_transform_flip_uses_the_mirror_encoding_and_flips_the_mask(latent_shards):
    sample = read_samples(latent_shards[0])["s0"]
    cfg = DataConfig(resolution_px=RES)
    plain = transform_latent_sample(sample, cfg, flip=False, generator=torch.Generator().manual_seed(0))
    flipped = transform_latent_sample(sample, cfg, flip=True, generator=torch.Generator().manual_seed(0))
    stored_flip = torch.from_numpy(np.load(io.BytesIO(sample["latent_hflip.npy"])).astype(np.float32))
    noise = torch.randn(stored_flip[0].shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped["latents"], stored_flip[0] + torch.exp(0.5 * stored_flip[1]) * noise)
    torch.testing.assert_close(flipped["mask"], plain["mask"].flip(-1))
    assert not torch.equal(flipped["mask"], plain["mask"])


def test_transform_accepts_decoded_samples(latent_shards):
    raw = read_samples(latent_shards[0])["s3"]
    decoded = {"__key__": "s3", "latent.npy": np.load(io.BytesIO(raw["latent.npy"])),
               "latent_hflip.npy": np.load(io.BytesIO(raw["latent_hflip.npy"])),
               "mask.png": Image.open(io.BytesIO(raw["mask.png"])), "caption.txt": raw["caption.txt"].decode(),
               "json": json.loads(raw["json"])}
    cfg = DataConfig(resolution_px=RES)
    a = transform_latent_sample(raw, cfg, flip=True, generator=torch.Generator().manual_seed(1))
    b = transform_latent_sample(decoded, cfg, flip=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["latents"], b["latents"])
    torch.testing.assert_close(a["mask"], b["mask"])
    assert "text_embeds" not in b


def test_transform_refuses_settings_latents_cannot_honour(latent_shards):
    sample = read_samples(latent_shards[0])["s0"]
    with pytest.raises(ValueError, match="data.resolution_px"):
        transform_latent_sample(sample, DataConfig(resolution_px=128), flip=False)
    with pytest.raises(ValueError, match="data.vflip"):
        transform_latent_sample(sample, DataConfig(resolution_px=RES, vflip=True), flip=False)


def test_cli_prepare_latents(image_shards, tiny_model_dir, tmp_path, capsys):
    from defect_ds.cli import main

    out = tmp_path / "lat"
    args = ["prepare", "latents", str(image_shards), str(out), "--pretrained", str(tiny_model_dir),
            "--resolution-px", "32", "--batch-size", "3", "--device", "cpu", "--no-hflip", "--mean-only",
            "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "latents" and manifest["latent_shape"] == [4, 4, 4]
    sample = read_samples(out)["s1"]
    assert "latent_hflip.npy" not in sample and "text_embeds.npy" not in sample
    mean = np.load(io.BytesIO(sample["latent.npy"]))
    out_sample = transform_latent_sample(sample, DataConfig(resolution_px=32), flip=False)
    torch.testing.assert_close(out_sample["latents"], torch.from_numpy(mean.astype(np.float32)))  # no noise
    assert main(args) == 2  # OUT holds shards: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_a_flipped_sample_keeps_its_mask_on_the_defect_in_its_stored_latents(tiny_model_dir, tmp_path):
    """The defect is the only bright patch, left of centre; after a flip both the stored mirror latents and
    the mask must put it on the right, at the same latent pixels (the loss weights exactly those)."""
    from defect_ds.model.objective import latent_mask

    pixels = np.zeros((RES, RES, 3), np.uint8)
    pixels[16:32, 8:24] = 255  # the defect, where _mask-like coordinates put it
    mask = np.zeros((RES, RES), np.uint8)
    mask[16:32, 8:24] = 255
    src = tmp_path / "images"
    src.mkdir()
    with wds.TarWriter(str(src / "train-000000.tar")) as writer:
        for key, image in (("defect", pixels), ("blank", np.zeros_like(pixels))):
            writer.write({"__key__": key, "image.png": _png(Image.fromarray(image)),
                          "mask.png": _png(Image.fromarray(mask)), "caption.txt": b"a part",
                          "json": json.dumps({"category": "part", "defect_type": "spot", "split": "train",
                                              "source": key, "size": [RES, RES]}).encode()})
    (src / "manifest.json").write_text(json.dumps({"kind": "images", "defect_tokens": {}, "counts": {},
                                                   "shards": {"train": [{"name": "train-000000.tar",
                                                                         "samples": 2}], "val": []}}))
    encode_shards(src, tmp_path / "lat", tiny_model_dir, resolution_px=RES, batch_size=2, device="cpu",
                  mean_only=True)
    samples = read_samples(tmp_path / "lat")
    cfg = DataConfig(resolution_px=RES)
    for flip in (False, True):
        defect = transform_latent_sample(samples["defect"], cfg, flip=flip)
        blank = transform_latent_sample(samples["blank"], cfg, flip=flip)
        change = (defect["latents"] - blank["latents"]).abs().sum(0)  # where the bright patch shows
        weights = latent_mask(defect["mask"][None], change.shape)[0, 0]
        mirrored = weights.flip(-1)  # where the mask would be had one of the two not been flipped

        def inside(m):
            return float((change * m).sum() / m.sum())

        assert inside(weights) > 1.1 * inside(mirrored), (flip, inside(weights), inside(mirrored))
        assert (weights[:, : RES // 16].sum() > 0) != flip  # the patch is left unflipped, right flipped


def test_loader_draws_the_posterior_the_same_whatever_the_global_rng_and_worker_count(latent_shards):
    """The trainer reseeds torch's global RNG every step; the draw must not see that (exact resume)."""
    from defect_ds.data.loader import build_loader

    out, _ = latent_shards

    def latents(num_workers: int, global_seed: int, skip: int = 0) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        cfg = DataConfig(train_shards=str(out), resolution_px=RES, num_workers=num_workers)
        loader = build_loader(cfg, micro_batch_size=1, rank=0, world_size=1, seed=3, epoch=0, skip_batches=skip)
        return [b["latents"] for b in loader]

    first = latents(0, global_seed=0)
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, latents(0, global_seed=1)))
    assert all(torch.equal(a, b) for a, b in zip(first, latents(2, global_seed=2)))
    assert all(torch.equal(a, b) for a, b in zip(first[2:], latents(0, global_seed=4, skip=2)))


def test_latents_train_only_on_a_base_with_their_codec(latent_shards, tiny_model_dir, tmp_path):
    """The shards record their codec's fingerprint; a base with another VAE is refused in one sentence
    before the run starts, one that shares the VAE (a UNet retrained with --vae-from) passes."""
    import shutil

    from diffusers import AutoencoderKL

    from defect_ds.config import load_config
    from defect_ds.data.latents import check_codec, codec_fingerprint
    from defect_ds.train.preflight import check_run_inputs

    out, manifest = latent_shards
    assert manifest["latent_source"]["codec_fingerprint"] == codec_fingerprint(tiny_model_dir)
    same_codec = tmp_path / "same-codec"
    shutil.copytree(tiny_model_dir, same_codec)
    (same_codec / "unet" / "config.json").write_text((same_codec / "unet" / "config.json").read_text() + "\n")
    config = json.loads((same_codec / "vae" / "config.json").read_text())  # saved from elsewhere: same codec
    (same_codec / "vae" / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere/vae"}))
    check_codec(manifest, out, same_codec)

    other = tmp_path / "other-codec"
    shutil.copytree(tiny_model_dir, other)
    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.save_pretrained(other / "vae")
    cfg = load_config(None, [f"--model.pretrained_dir={other}", f"--data.train_shards={out}",
                             "--data.resolution_px=64", "--train.micro_batch_size=1"])
    with pytest.raises(ValueError, match=r"holds latents encoded with the codec of .*; encode the image shards again") as e:
        check_run_inputs(cfg, 1)
    assert "\n" not in str(e.value)

    older = {k: v for k, v in manifest.items() if k != "latent_source"}  # shards written before fingerprints
    check_codec(older, out, other)  # the same scaling factor: nothing to tell them apart by
    with pytest.raises(ValueError, match="encode the image shards again"):
        check_codec({**older, "scaling_factor": 1.3}, out, tiny_model_dir)
    check_codec({"kind": "images"}, out, other)  # image shards are encoded as they train
