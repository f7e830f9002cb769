"""`defect-ds generate` on the tiny offline model: exports load, inpainting keeps the source outside
the mask bit for bit, samples land as folders and training-format shards, and runs resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_ds.cli import main
from defect_ds.procedural_masks import object_region, random_mask

TOKENS = {"scratch": "sks_scratch", "stain": "sks_stain"}
VECTORS = 2  # multi-vector tokens: the prompt's token is expanded by diffusers' loader


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A run directory whose export is what the trainer writes: LoRA (random, non-zero B) + tokens."""
    from defect_ds import export, textual_inversion
    from defect_ds.config import LoraConfig, ModelConfig
    from defect_ds.models import add_lora, load_components

    torch.manual_seed(0)
    parts = load_components(ModelConfig(pretrained_dir=str(tiny_model_dir)))
    add_lora(parts.unet, LoraConfig())
    with torch.no_grad():
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    textual_inversion.add_tokens(parts.tokenizer, parts.text_encoder, list(TOKENS.values()), VECTORS, "defect")
    with torch.no_grad():
        parts.text_encoder.get_input_embeddings().learned_vectors.normal_(0, 1)
    embeddings = textual_inversion.learned_embeddings(parts.text_encoder, list(TOKENS.values()), VECTORS)
    lora_state = export.lora_state_dict(parts.unet)
    run_dir = tmp_path_factory.mktemp("run")
    meta = {"base_model": str(Path(tiny_model_dir).resolve()), "tokens": TOKENS, "vectors_per_token": VECTORS,
            "resolution_px": 64, "step": 3, "mask_gating": True, "unet_mode": "lora"}
    export.write_export(run_dir / "export", meta=meta, lora_state=lora_state, embeddings=embeddings)
    return {"run_dir": run_dir, "lora_state": lora_state, "embeddings": embeddings}


def _object_image(seed: int, size: int = 64) -> np.ndarray:
    """A textured bright disc (the object) on a dark plain background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.35) ** 2
    image = np.full((size, size, 3), 20, np.uint8)
    image[disc] = (150 + rng.integers(0, 60, (int(disc.sum()), 3))).astype(np.uint8)
    return image


def _read(path: Path, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(path).convert(mode))


def _samples(out: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in sorted((out / "samples").glob("*/json"))}


def test_procedural_masks_are_seeded_binary_and_on_the_object():
    image = _object_image(0)
    region = object_region(image)
    assert 0.2 < region.mean() < 0.5  # the disc (minus an eroded rim), not the background
    for kind in ("stroke", "blob", "mixed"):
        for seed in range(5):
            a = random_mask(64, 64, np.random.default_rng(seed), region, kind)
            b = random_mask(64, 64, np.random.default_rng(seed), region, kind)
            assert a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
            assert np.array_equal(a, b)  # the same seed draws the same mask
            assert a.sum() >= 4 and not (a.astype(bool) & ~region).any()  # non-empty, inside the object
            assert a.mean() < 0.5 * region.mean()  # a defect, not the whole object
    masks = [random_mask(64, 64, np.random.default_rng(s), region) for s in range(6)]
    assert len({m.tobytes() for m in masks}) == 6  # different seeds, different masks


def test_build_pipeline_loads_the_trainer_export(trained_run):
    from defect_ds.generation import build_pipeline

    pipe, tokens, info = build_pipeline(run=str(trained_run["run_dir"]))
    assert tokens == TOKENS
    assert info["base_model"] and Path(info["export"]).name == "export"
    # learned vectors: the loaded tokens embed to exactly the exported vectors
    table = pipe.text_encoder.get_input_embeddings().weight
    for token, vectors in trained_run["embeddings"].items():
        ids = pipe.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
        assert pipe.tokenizer.unk_token_id not in ids
        torch.testing.assert_close(table[ids].float(), vectors)
    # LoRA: the exported (random, non-zero) up-projections are in the UNet, and the mask gates them
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert loaded and all(p.abs().sum() > 0 for p in loaded.values())
    assert getattr(pipe.unet, "mask_gate", None) is not None and pipe.unet.mask_gate.gated_layers


def test_inpaint_keeps_every_pixel_outside_the_mask(trained_run, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    sources = [_object_image(s) for s in range(3)]
    for i, image in enumerate(sources):
        Image.fromarray(image).save(good / f"good_{i}.png")
    out = tmp_path / "inpaint"
    rc = main(["generate", str(out), "--run", str(trained_run["run_dir"]), "--mode", "inpaint",
               "--sources", str(good), "--num-per-type", "2", "--steps", "3", "--batch-size", "3",
               "--guidance-scale", "3", "--seed", "7", "--no-progress"])
    assert rc == 0
    samples = _samples(out)
    assert sorted(samples) == ["scratch-000000", "scratch-000001", "stain-000000", "stain-000001"]
    changed_inside = 0
    for folder in samples.values():
        image, source = _read(folder / "image.png"), _read(folder / "source.png")
        mask = _read(folder / "mask.png", "L")
        assert set(np.unique(mask)) == {0, 255}
        assert any(np.array_equal(source, s) for s in sources)  # the given good image, untouched
        outside = mask == 0
        assert np.array_equal(image[outside], source[outside])  # bit-exact: the mask is an exact label
        changed_inside += int((image[~outside] != source[~outside]).any())
        assert not (mask.astype(bool) & ~object_region(source)).any()  # the defect sits on the object
        meta = json.loads((folder / "json").read_text())
        gen = meta["generation"]
        assert gen["mode"] == "inpaint" and gen["steps"] == 3 and gen["guidance_scale"] == 3.0
        assert TOKENS[meta["defect_type"]] in gen["prompt"] and gen["seed"] >= 7
        # before compositing the decoded image also changed outside the mask: compositing is what
        # makes the label exact, so the equality above is not true by accident
        assert gen["mask_localisation_before_composite"] < 1.0
    assert changed_inside == len(samples)  # something was painted inside every mask
    assert (out / "grid.png").is_file()


def test_text2img_writes_folders_and_shards_and_resumes(trained_run, tmp_path, capsys):
    import webdataset as wds

    out = tmp_path / "gen"
    args = ["generate", str(out), "--run", str(trained_run["run_dir"]), "--num-per-type", "2", "--steps", "2",
            "--scheduler", "dpm++", "--batch-size", "3", "--seed", "3", "--no-progress"]
    assert main(args) == 0
    samples = _samples(out)
    assert len(samples) == 4
    first = {k: (f / "image.png").read_bytes() for k, f in samples.items()}
    seeds = {json.loads((f / "json").read_text())["generation"]["seed"] for f in samples.values()}
    assert len(seeds) == 4

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["defect_tokens"] == TOKENS and manifest["splits"]["train"]["num_samples"] == 4
    shards = sorted(str(p) for p in (out / "shards").glob("train-*.tar"))
    rows = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert sorted(r["__key__"] for r in rows) == sorted(samples)
    for r in rows:
        meta = json.loads(r["json"])
        assert {"category", "defect_type", "source", "split", "size"} <= set(meta)
        assert r["image.png"] == first[r["__key__"]]
        assert TOKENS[meta["defect_type"]] in r["caption.txt"].decode()
        assert Image.open(__import__("io").BytesIO(r["mask.png"])).mode == "L"

    # resume: only the missing sample is generated again, and it comes out the same
    shutil.rmtree(samples["stain-000001"])
    capsys.readouterr()
    assert main(args) == 0
    assert "3 already written, 1 to go" in capsys.readouterr().out
    again = {k: (f / "image.png").read_bytes() for k, f in _samples(out).items()}
    assert again.keys() == first.keys()
    for key in first:
        if key != "stain-000001":
            assert again[key] == first[key]
    a, b = (np.asarray(Image.open(__import__("io").BytesIO(x[k]))) for x, k in
            ((first, "stain-000001"), (again, "stain-000001")))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # same seed; batch composition may round

    # resuming with other settings would mix two recipes in one folder: refused with a clear error
    assert main(args[:-1] + ["--steps", "5", "--no-progress"]) == 2
    assert "steps=2" in capsys.readouterr().err


def test_dataset_masks_and_sources_and_loose_files(trained_run, tiny_model_dir, tmp_path):
    """Masks and good images from a training-format shard; weights given as files, Euler scheduler."""
    import webdataset as wds

    data = tmp_path / "data"
    data.mkdir()
    good = _object_image(11)
    masks = [random_mask(64, 64, np.random.default_rng(s), object_region(good)) for s in (1, 2)]
    with wds.TarWriter(str(data / "train-000000.tar")) as sink:
        for i, (defect_type, mask) in enumerate([("scratch", masks[0]), ("scratch", masks[1]),
                                                 ("good", np.zeros((64, 64), np.uint8))]):
            png = __import__("io").BytesIO()
            Image.fromarray(good if defect_type == "good" else _object_image(20 + i)).save(png, format="PNG")
            mpng = __import__("io").BytesIO()
            Image.fromarray(mask * 255).save(mpng, format="PNG")
            sink.write({"__key__": f"s{i}", "image.png": png.getvalue(), "mask.png": mpng.getvalue(),
                        "caption.txt": "a photo", "json": {"category": "pill", "defect_type": defect_type,
                                                           "source": "real", "split": "train", "size": [64, 64]}})
    export = trained_run["run_dir"] / "export"
    out = tmp_path / "gen"
    rc = main(["generate", str(out), "--base-model", str(tiny_model_dir),
               "--lora", str(export / "pytorch_lora_weights.safetensors"),
               "--embeddings", f"scratch={export / 'learned_embeds' / 'sks_scratch.safetensors'}",
               str(export / "learned_embeds" / "sks_stain.safetensors"), "--defect-types", "scratch",
               "--mode", "inpaint", "--sources", str(data), "--masks", "dataset", "--data", str(data),
               "--scheduler", "euler", "--num-per-type", "3", "--steps", "2", "--no-progress"])
    assert rc == 0
    samples = _samples(out)
    assert len(samples) == 3
    for i, folder in enumerate(samples.values()):
        mask = _read(folder / "mask.png", "L") > 127
        assert np.array_equal(mask, masks[i % 2].astype(bool))  # the data set's scratch masks, in order
        assert np.array_equal(_read(folder / "source.png"), good)  # the data set's only good sample
        image = _read(folder / "image.png")
        assert np.array_equal(image[~mask], good[~mask])
        meta = json.loads((folder / "json").read_text())
        assert meta["category"] == "pill" and meta["defect_type"] == "scratch"
        assert meta["generation"]["token"] == "sks_scratch" and meta["generation"]["scheduler"] == "euler"


def test_bad_requests_fail_with_one_sentence(trained_run, tmp_path, capsys):
    run = str(trained_run["run_dir"])
    assert main(["generate", str(tmp_path / "a"), "--run", run, "--defect-types", "dent", "--no-progress"]) == 2
    assert "dent" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "b"), "--run", run, "--mode", "inpaint", "--no-progress"]) == 2
    assert "--sources" in capsys.readouterr().err


@pytest.mark.gpu
def test_bf16_generation_on_gpu(trained_run, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(_object_image(0)).save(good / "g.png")
    out = tmp_path / "gpu"
    assert main(["generate", str(out), "--run", str(trained_run["run_dir"]), "--mode", "inpaint", "--sources",
                 str(good), "--num-per-type", "2", "--steps", "3", "--device", "cuda", "--precision", "bf16",
                 "--no-progress"]) == 0
    for folder in _samples(out).values():
        assert json.loads((folder / "json").read_text())["generation"]["precision"] == "bf16"
        mask = _read(folder / "mask.png", "L") == 0
        assert np.array_equal(_read(folder / "image.png")[mask], _read(folder / "source.png")[mask])
