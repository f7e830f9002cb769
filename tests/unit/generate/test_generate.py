"""`defect-ds generate` on the tiny offline model: exports load, inpainting keeps the source outside
the mask bit for bit, samples land as folders and training-format shards, and runs resume."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_ds.cli import main
from defect_ds.data.objects import object_region
from defect_ds.data.masks import random_mask

TOKENS = {"scratch": "sks_scratch", "stain": "sks_stain"}
VECTORS = 2  # multi-vector tokens: the prompt's token is expanded by diffusers' loader


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A run directory whose export is what the trainer writes: LoRA (random, non-zero B) + tokens."""
    from defect_ds.config import LoraConfig, ModelConfig
    from defect_ds.model import textual_inversion
    from defect_ds.model.components import add_lora, load_components
    from defect_ds.train import export

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
    from defect_ds.generate.pipeline import build_pipeline

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


def test_mask_resize_follows_the_export_and_old_exports_stay_nearest(trained_run, tmp_path):
    """Training defaults to max now; an export records its resize and generation gates the same way,
    and an export.json without the field (written when nearest was the default) keeps nearest."""
    from defect_ds.config import LoraConfig
    from defect_ds.generate.pipeline import build_pipeline

    assert LoraConfig().mask_resize == "max"
    export = trained_run["run_dir"] / "export"
    meta = json.loads((export / "export.json").read_text())
    assert "mask_resize" not in meta  # the fixture is an old export
    got = {}
    for name, recorded in (("old", None), ("nearest", "nearest"), ("max", "max")):
        folder = tmp_path / name / "export"
        shutil.copytree(export, folder)
        if recorded:
            (folder / "export.json").write_text(json.dumps({**meta, "mask_resize": recorded}))
        got[name] = build_pipeline(run=str(folder))[2]["mask_resize"]
    assert got == {"old": "nearest", "nearest": "nearest", "max": "max"}
    # a loose LoRA takes the export.json beside it; the flag overrides either
    lora = tmp_path / "max" / "export" / "pytorch_lora_weights.safetensors"
    assert build_pipeline(base_model=meta["base_model"], lora=str(lora))[2]["mask_resize"] == "max"
    assert build_pipeline(run=str(tmp_path / "max"), mask_resize="nearest")[2]["mask_resize"] == "nearest"


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
            "--scheduler", "dpm++", "--batch-size", "3", "--seed", "3", "--shard-size", "3", "--no-progress"]
    assert main(args) == 0
    samples = _samples(out)
    assert len(samples) == 4
    first = {k: (f / "image.png").read_bytes() for k, f in samples.items()}
    seeds = {json.loads((f / "json").read_text())["generation"]["seed"] for f in samples.values()}
    assert len(seeds) == 4

    # the training format: the data code's manifest reader and the trainer's loader take the shards
    from defect_ds.config import DataConfig
    from defect_ds.data.loader import build_loader
    from defect_ds.data.shards import read_manifest

    manifest = read_manifest(out / "shards")
    assert manifest["defect_tokens"] == TOKENS and manifest["counts"]["train"] == {"scratch": 2, "stain": 2}
    assert [s["samples"] for s in manifest["shards"]["train"]] == [3, 1]  # --shard-size 3
    cfg = DataConfig(train_shards=str(out / "shards"), resolution_px=64, shuffle_buffer=4)
    loader = build_loader(cfg, micro_batch_size=2, rank=0, world_size=1, seed=0, epoch=0)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["mask"].shape == (2, 1, 64, 64)
        assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}  # a defect in every generated mask
        assert all(TOKENS[t] in c for t, c in zip(batch["defect_type"], batch["caption"]))
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


def test_layout_mvtec_also_writes_the_mvtec_tree(trained_run, tmp_path):
    from defect_ds.data.mvtec import read_index

    out = tmp_path / "gen"
    assert main(["generate", str(out), "--run", str(trained_run["run_dir"]), "--num-per-type", "1", "--steps", "1",
                 "--category", "pill", "--layout", "mvtec", "--no-progress"]) == 0
    rows = read_index(out / "mvtec")
    assert sorted(r["key"] for r in rows) == sorted(_samples(out))
    for row in rows:
        folder = out / "samples" / row["key"]
        assert row["image"] == f"pill/test/{row['key'].split('-')[0]}/000.png"
        assert (np.asarray(Image.open(out / "mvtec" / row["mask"])) == _read(folder / "mask.png", "L")).all()
        assert (np.asarray(Image.open(out / "mvtec" / row["image"])) == _read(folder / "image.png")).all()
    assert (out / "mvtec" / "pill" / "train" / "good").is_dir()


def test_a_full_disk_is_one_sentence_and_the_rerun_resumes(trained_run, tmp_path, capsys, full_disk):
    out = tmp_path / "gen"
    args = ["generate", str(out), "--run", str(trained_run["run_dir"]), "--num-per-type", "2", "--steps", "1",
            "--batch-size", "1", "--no-progress"]
    full_disk.fill(after_writes=1 + 2 * 4)  # generation.json, then two samples of 4 files each
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"defect-ds generate: error: No space left while writing {re.escape(str(out))}/samples/"
                        r"\S+; nothing there was changed; the finished samples are kept, so free space and rerun "
                        r"the same command to resume\.", err), err
    assert len(_samples(out)) == 2 and not (out / "shards").exists()
    full_disk.free()
    assert main(args) == 0
    assert "2 already written, 2 to go" in capsys.readouterr().out
    assert len(_samples(out)) == 4 and (out / "shards" / "manifest.json").is_file()


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
    # only generated types get a token in the manifest: a run on these shards learns no empty token
    assert json.loads((out / "shards" / "manifest.json").read_text())["defect_tokens"] == {"scratch": "sks_scratch"}


def _write_shots(folder: Path, samples: list[tuple[str, np.ndarray, np.ndarray]]) -> Path:
    """A one-shard data set of (defect_type, image, mask) samples, category pill."""
    import io

    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i, (defect_type, image, mask) in enumerate(samples):
            png, mpng = io.BytesIO(), io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            Image.fromarray(mask * 255).save(mpng, format="PNG")
            sink.write({"__key__": f"s{i}", "image.png": png.getvalue(), "mask.png": mpng.getvalue(),
                        "caption.txt": "a photo", "json": {"category": "pill", "defect_type": defect_type,
                                                           "source": "real", "split": "train", "size": [64, 64]}})
    return folder


def test_augmented_masks_end_to_end_and_a_type_without_shots(trained_run, tmp_path, capsys):
    good = _object_image(11)
    scratch = np.zeros((64, 64), np.uint8)
    scratch[28:31, 20:44] = 1
    data = _write_shots(tmp_path / "shots", [("scratch", _object_image(3), scratch),
                                             ("stain", _object_image(4), np.zeros((64, 64), np.uint8)),
                                             ("good", good, np.zeros((64, 64), np.uint8))])
    run = str(trained_run["run_dir"])
    out = tmp_path / "gen"
    args = ["generate", str(out), "--run", run, "--mode", "inpaint", "--sources", str(data), "--masks", "augmented",
            "--data", str(data), "--defect-types", "scratch", "--num-per-type", "2", "--steps", "1", "--no-progress"]
    assert main(args) == 0
    region = object_region(good)
    for folder in _samples(out).values():
        mask = _read(folder / "mask.png", "L")
        assert set(np.unique(mask)) == {0, 255} and not ((mask > 0) & ~region).any()
        gen = json.loads((folder / "json").read_text())["generation"]
        assert gen["mask_source"] == "augmented" and gen["mask_origin"].startswith("augmented:")
        assert gen["mask_augmentation"]["elastic_seed"] >= 0 and "offset_yx" in gen["mask_placement"]
    # the stain shot's mask is empty: augmented says so and names the type
    capsys.readouterr()
    bad = [a if a != "scratch" else "stain" for a in args]
    bad[1] = str(tmp_path / "gen2")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "'stain'" in err and "Augmented masks" in err
    assert main(["generate", str(tmp_path / "gen3"), "--run", run, "--data", str(data), "--no-progress"]) == 2
    assert "masks.source=dataset or augmented" in capsys.readouterr().err


def test_bad_requests_fail_with_one_sentence(trained_run, tmp_path, capsys):
    run = str(trained_run["run_dir"])
    assert main(["generate", str(tmp_path / "a"), "--run", run, "--defect-types", "dent", "--no-progress"]) == 2
    assert "dent" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "b"), "--run", run, "--mode", "inpaint", "--no-progress"]) == 2
    assert "samples.mode=inpaint needs samples.sources" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "b"), "--run", run, "--masks", "dataset", "--no-progress"]) == 2
    assert "masks.source=dataset needs masks.data" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "b"), "--run", run, "--mask-dir", str(tmp_path), "--no-progress"]) == 2
    assert "masks.source=files" in capsys.readouterr().err  # a mask folder that would be silently ignored

    # a call that fails on its inputs leaves no generation.json that would refuse the corrected call
    out = tmp_path / "c"
    assert main(["generate", str(out), "--run", run, "--masks", "files", "--no-progress"]) == 2
    assert "masks.dir" in capsys.readouterr().err and not (out / "generation.json").exists()
    empty_dir = tmp_path / "no-masks"
    empty_dir.mkdir()
    assert main(["generate", str(out), "--run", run, "--masks", "files", "--mask-dir", str(empty_dir),
                 "--no-progress"]) == 2
    assert str(empty_dir) in capsys.readouterr().err and not (out / "generation.json").exists()
    assert main(["generate", str(out), "--run", run, "--num-per-type", "1", "--steps", "1", "--no-progress"]) == 0
    # and a folder whose earlier call wrote settings but no sample is new, not a resume to refuse
    (out / "generation.json").write_text(json.dumps({"steps": 99}))
    shutil.rmtree(out / "samples")
    assert main(["generate", str(out), "--run", run, "--num-per-type", "1", "--steps", "1", "--no-progress"]) == 0
    assert json.loads((out / "generation.json").read_text())["steps"] == 1


def test_a_toml_config_then_the_flags_then_overrides(trained_run, tmp_path, capsys):
    """The file sets what the command line leaves alone; an alias flag and a --section.field override beat it."""
    config = tmp_path / "generate.toml"
    config.write_text(f'[weights]\nrun = "{trained_run["run_dir"]}"\n'
                      '[samples]\nnum_per_type = 1\ncategory = "pill"\n'
                      '[sampling]\nsteps = 3\nseed = 5\nguidance_scale = 3.0\n'
                      '[output]\nprogress = false\n')
    out = tmp_path / "gen"
    assert main(["generate", str(out), "--config", str(config), "--steps", "1", "--sampling.seed=9"]) == 0
    gen = json.loads((out / "generation.json").read_text())
    assert (gen["steps"], gen["seed"], gen["guidance_scale"], gen["category"]) == (1, 9, 3.0, "pill")
    assert sorted(_samples(out)) == ["scratch-000000", "stain-000000"]

    capsys.readouterr()  # an unknown field, on the command line or in the file: one sentence, nothing written
    assert main(["generate", str(tmp_path / "a"), "--config", str(config), "--sampling.stepz=1"]) == 2
    assert capsys.readouterr().err == ("defect-ds generate: error: Unknown setting sampling.stepz; the sampling "
                                       "section knows: scheduler, steps, guidance_scale, inpaint_mask, strength, "
                                       "seed, resolution_px, batch_size, device, precision.\n")
    config.write_text('[masks]\nsize = [0.1, "big"]\n')
    assert main(["generate", str(tmp_path / "a"), "--config", str(config), "--run", "x"]) == 2
    assert capsys.readouterr().err == ("defect-ds generate: error: masks.size[1]='big' has the wrong type: expected a "
                                       "number.\n")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda meta: [meta], "holds a list, not an object of fields"),
    (lambda meta: {**meta, "tokens": ["sks_scratch", "sks_stain"]}, "tokens must map each defect type to its token"),
    (lambda meta: {**meta, "mask_gating": "no"}, "mask_gating is 'no'; write true or false"),
    (lambda meta: "{not json", "is not readable JSON"),
])
def test_a_hand_edited_export_json_is_one_sentence(trained_run, tmp_path, capsys, edit, message):
    export = tmp_path / "export"
    shutil.copytree(trained_run["run_dir"] / "export", export)
    meta = edit(json.loads((export / "export.json").read_text()))
    (export / "export.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    out = tmp_path / "gen"
    assert main(["generate", str(out), "--run", str(export), "--num-per-type", "1", "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"defect-ds generate: error: {export / 'export.json'}") and message in err, err
    assert "\n" not in err and not out.exists()


def test_weights_of_the_wrong_shape_name_the_file_and_the_shape_expected(trained_run, tiny_model_dir, tmp_path,
                                                                        capsys):
    from safetensors.torch import save_file

    lora_state = dict(trained_run["lora_state"])
    down = next(k for k in lora_state if k.endswith("to_q.lora.down.weight"))
    rank, width = lora_state[down].shape
    lora_state[down] = torch.zeros(rank, width * 2)  # a LoRA of a wider base model
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(lora_state, str(lora))
    embeds = tmp_path / "embeds"
    embeds.mkdir()
    save_file({"sks_scratch": torch.zeros(VECTORS, width + 1)}, str(embeds / "sks_scratch.safetensors"))
    good_embeds = trained_run["run_dir"] / "export" / "learned_embeds"
    base = ["--base-model", str(tiny_model_dir), "--num-per-type", "1", "--steps", "1", "--no-progress"]
    assert main(["generate", str(tmp_path / "a"), "--lora", str(lora), "--embeddings", str(good_embeds), *base]) == 2
    assert capsys.readouterr().err.strip() == (
        f"defect-ds generate: error: {lora}: {down} has shape ({rank}, {2 * width}), but the base model's layer "
        f"{down[:-len('.lora.down.weight')]} takes (rank, {width}); pass a LoRA trained on this base model.")
    assert main(["generate", str(tmp_path / "b"), "--embeddings", str(embeds), *base]) == 2
    assert capsys.readouterr().err.strip() == (
        f"defect-ds generate: error: {embeds / 'sks_scratch.safetensors'} holds 'sks_scratch' of shape ({VECTORS}, "
        f"{width + 1}), but the base model's text encoder takes vectors of {width} values, shape (vectors, {width}); "
        "pass embeddings trained on this base model.")
    export = tmp_path / "export"  # the same checks guard an export folder
    shutil.copytree(trained_run["run_dir"] / "export", export)
    shutil.copy(lora, export / "pytorch_lora_weights.safetensors")
    assert main(["generate", str(tmp_path / "c"), "--run", str(export), "--num-per-type", "1", "--steps", "1",
                 "--no-progress"]) == 2
    assert f"takes (rank, {width})" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_file_masks_keep_off_centre_defects_and_skip_empty_ones(tmp_path, caplog):
    from defect_ds.data.reader import load_mask_pool

    folder = tmp_path / "masks"
    (folder / "scratch").mkdir(parents=True)
    wide = np.zeros((64, 256), np.uint8)
    wide[20:40, 4:30] = 255  # near the left edge: a centre crop to 64x64 would cut all of it off
    Image.fromarray(wide).save(folder / "scratch" / "wide.png")
    thin = np.zeros((512, 512), np.uint8)
    thin[100:400, 301] = 255  # one pixel wide at 512 px: nearest resizing to 64 px misses it
    Image.fromarray(thin).save(folder / "scratch" / "thin.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "scratch" / "blank.png")
    with caplog.at_level("WARNING"):
        pool = load_mask_pool("files", str(folder), 64)
    assert [Path(origin).name for _, origin, _ in pool["scratch"]] == ["thin.png", "wide.png"]
    thin_mask, wide_mask = (m for m, _, _ in pool["scratch"])
    assert wide_mask.shape == (64, 64) and wide_mask.sum() == 20 * 26  # the whole defect, at scale 1
    assert thin_mask.sum() >= 300 // 8 and set(np.unique(thin_mask)) == {0, 1}
    assert "skipped 1 mask(s)" in caplog.text and "blank.png" in caplog.text  # counted, named

    only_empty = tmp_path / "empty"
    only_empty.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(only_empty / "a.png")
    with pytest.raises(ValueError, match="a.png"):
        load_mask_pool("files", str(only_empty), 64)


def _loose_export(trained_run, folder: Path, with_meta: bool) -> Path:
    """A copy of the export's learned_embeds folder, with or without the export.json above it."""
    shutil.copytree(trained_run["run_dir"] / "export" / "learned_embeds", folder / "learned_embeds")
    if with_meta:
        meta = json.loads((trained_run["run_dir"] / "export" / "export.json").read_text())
        (folder / "export.json").write_text(json.dumps({**meta, "tokens": {"dent": "sks_scratch",
                                                                            "smear": "sks_stain"}}))
    return folder / "learned_embeds"


def test_loose_embeddings_are_typed_by_export_json_or_token_prefix(trained_run, tmp_path):
    from defect_ds.generate.pipeline import resolve_embeddings
    from safetensors.torch import save_file

    # export.json beside the folder names the types, even where the token says otherwise
    typed = resolve_embeddings([str(_loose_export(trained_run, tmp_path / "a", with_meta=True))])
    assert {t: token for t, (token, _) in typed.items()} == {"dent": "sks_scratch", "smear": "sks_stain"}
    # no export.json: the project's token prefix comes off ("sks_scratch" is the type "scratch")
    folder = _loose_export(trained_run, tmp_path / "b", with_meta=False)
    typed = resolve_embeddings([str(folder / "sks_scratch.safetensors")])
    assert {t: token for t, (token, _) in typed.items()} == {"scratch": "sks_scratch"}
    typed = resolve_embeddings([f"dent={folder / 'sks_stain.safetensors'}"])
    assert {t: token for t, (token, _) in typed.items()} == {"dent": "sks_stain"}
    # a token without the prefix and no export.json: the user must say
    save_file({"<crack>": torch.zeros(1, 32)}, str(tmp_path / "crack.safetensors"))
    with pytest.raises(ValueError, match="TYPE="):
        resolve_embeddings([str(tmp_path / "crack.safetensors")])


def test_loose_weights_are_recorded_and_a_resume_with_others_refused(trained_run, tiny_model_dir, tmp_path,
                                                                     capsys):
    export = trained_run["run_dir"] / "export"
    other_lora = tmp_path / "other" / "pytorch_lora_weights.safetensors"
    other_lora.parent.mkdir()
    shutil.copy(export / "pytorch_lora_weights.safetensors", other_lora)
    out = tmp_path / "gen"

    def args(lora: Path) -> list[str]:
        return ["generate", str(out), "--base-model", str(tiny_model_dir), "--lora", str(lora),
                "--embeddings", str(export / "learned_embeds"), "--mask-resize", "max",
                "--num-per-type", "1", "--steps", "1", "--no-progress"]

    assert main(args(export / "pytorch_lora_weights.safetensors")) == 0
    samples = _samples(out)
    assert sorted(samples) == ["scratch-000000", "stain-000000"]  # types from export.json, not token names
    gen = json.loads((samples["scratch-000000"] / "json").read_text())["generation"]
    assert gen["lora"] == str((export / "pytorch_lora_weights.safetensors").resolve())
    assert gen["embeddings"] == [f"scratch={(export / 'learned_embeds' / 'sks_scratch.safetensors').resolve()}",
                                 f"stain={(export / 'learned_embeds' / 'sks_stain.safetensors').resolve()}"]
    assert gen["mask_gating"] is True and gen["mask_resize"] == "max"
    assert gen["prompt"] == "a photo of a object with a sks_scratch"
    capsys.readouterr()
    assert main(args(other_lora)) == 2
    assert "lora=" in capsys.readouterr().err


def test_plan_prefers_masks_of_the_source_category_and_hints_at_defect_types():
    from defect_ds.generate.spec import GenerationSettings, plan_samples

    def mask(v):
        m = np.zeros((64, 64), np.uint8)
        m[v:v + 8, 10:30] = 1
        return m

    pool = {"scratch": [(mask(5), "a", "screw"), (mask(20), "b", "pill"), (mask(40), "c", "pill")]}
    sources = [(_object_image(0), "s0", "pill")]
    settings = GenerationSettings(mode="inpaint", mask_source="dataset")
    specs = plan_samples({"scratch": "sks_scratch"}, ["scratch"], 4, settings, mask_pool=pool, sources=sources)
    assert [s.mask_origin for s in specs] == ["b", "c", "b", "c"]  # only the pill's masks
    assert specs[0].prompt == "a photo of a pill with a sks_scratch"
    specs = plan_samples({"scratch": "sks_scratch"}, ["scratch"], 3, GenerationSettings(mask_source="dataset"),
                         mask_pool=pool, sources=[])
    assert [s.mask_origin for s in specs] == ["a", "b", "c"]  # text2img: every mask, in order
    tokens = {"scratch": "sks_scratch", "stain": "sks_stain"}
    with pytest.raises(ValueError, match="keep to the defect types that have masks"):
        plan_samples(tokens, ["stain"], 1, settings, mask_pool=pool, sources=sources)
    with pytest.raises(ValueError, match="TYPE=FILE"):
        plan_samples(tokens, ["stain"], 1, settings, mask_pool=pool, sources=sources, loose_weights=True)


def test_default_prompt_is_the_training_caption():
    from defect_ds.data.captions import caption_for
    from defect_ds.generate.spec import DEFAULT_PROMPT

    assert DEFAULT_PROMPT.format(category="pill", token="sks_crack", defect_type="crack") == \
        caption_for("pill", "crack", {"crack": "sks_crack"})


@pytest.mark.parametrize("unet_mode", ["lora", "full", "frozen"])
def test_generate_takes_every_export_the_trainer_writes(unet_mode, tiny_model_dir, tmp_path, monkeypatch):
    """The export is written by the trainer's own Exporter and `export_weights` (not by hand)."""
    from types import SimpleNamespace

    from defect_ds.config import RunConfig
    from defect_ds.generate.pipeline import build_pipeline
    from defect_ds.model import textual_inversion
    from defect_ds.model.components import add_lora, load_components, set_trainable
    from defect_ds.train.export import Exporter

    cfg = RunConfig()
    cfg.model.pretrained_dir, cfg.model.unet_mode = str(tiny_model_dir), unet_mode
    torch.manual_seed(0)
    parts = load_components(cfg.model)
    if unet_mode == "lora":
        add_lora(parts.unet, cfg.lora)
    textual_inversion.add_tokens(parts.tokenizer, parts.text_encoder, list(TOKENS.values()), 1, "defect")
    set_trainable(parts.unet, parts.text_encoder, unet_mode)
    with torch.no_grad():  # "trained" weights that differ from the base model's
        for name, p in parts.unet.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        parts.text_encoder.get_input_embeddings().learned_vectors.normal_(0, 1)
    trained = {n: p.detach().clone() for n, p in parts.unet.named_parameters() if p.requires_grad}
    exporter = Exporter(cfg.model, cfg.lora, cfg.textual_inversion, resolution_px=cfg.data.resolution_px,
                        defect_tokens=TOKENS, zero_stage=0, is_main=True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)  # one process, no group
    run_dir = tmp_path / "run"
    exporter.write(SimpleNamespace(unet=parts.unet, text_encoder=parts.text_encoder), run_dir / "export", step=5)
    assert (run_dir / "export" / "unet").is_dir() == (unet_mode == "full")

    pipe, tokens, info = build_pipeline(run=str(run_dir))
    assert tokens == TOKENS and info["export_step"] == 5
    assert info["mask_gating"] == (unet_mode == "lora")
    # LoRA keys carry the adapter's name, "default" in training and "default_0" once loaded
    plain = lambda name: re.sub(r"\.default(_\d+)?\.", ".", name)  # noqa: E731
    loaded = {plain(n): p for n, p in pipe.unet.named_parameters()}
    if unet_mode == "frozen":
        assert not trained and not any("lora_" in n for n in loaded)
    else:
        assert len(trained) > 0
        for name, value in trained.items():
            torch.testing.assert_close(loaded[plain(name)].detach(), value)

    out = tmp_path / "gen"
    assert main(["generate", str(out), "--run", str(run_dir), "--num-per-type", "1", "--steps", "1",
                 "--no-progress"]) == 0
    assert sorted(_samples(out)) == ["scratch-000000", "stain-000000"]


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


def test_learned_masks_end_to_end(trained_run, tmp_path, capsys):
    from defect_ds.generate.mask_model import train_mask_model

    masks = []
    for v in (10, 30):
        m = np.zeros((64, 64), np.uint8)
        m[v:v + 6, 20:40] = 1
        masks.append(m)
    data = _write_shots(tmp_path / "shots", [("scratch", _object_image(3), masks[0]),
                                             ("stain", _object_image(4), masks[1])])
    model = train_mask_model(str(data), tmp_path / "mm", resolution_px=64, steps=2, batch_size=2, log_every=0,
                             bank_per_type=2)
    out = tmp_path / "gen"
    args = ["generate", str(out), "--run", str(trained_run["run_dir"]), "--masks", "learned", "--mask-model",
            str(model), "--num-per-type", "1", "--steps", "1", "--no-progress"]
    assert main(args) == 0
    for folder in _samples(out).values():
        assert set(np.unique(_read(folder / "mask.png", "L"))) == {0, 255}
        gen = json.loads((folder / "json").read_text())["generation"]
        assert gen["mask_source"] == "learned" and gen["mask_model"] == str(model.resolve())
    capsys.readouterr()
    assert main(args[:1] + [str(tmp_path / "gen2")] + args[2:] + ["--resolution-px", "32"]) == 2
    assert "draws 64 px masks but generation is at 32 px" in capsys.readouterr().err


def test_a_truncated_source_is_one_sentence_before_the_pipeline_loads_or_skipped_with_skip_bad(
        trained_run, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(2):
        Image.fromarray(_object_image(i)).save(good / f"good_{i}.png")
    whole = (good / "good_1.png").read_bytes()
    (good / "good_1.png").write_bytes(whole[:len(whole) // 2])  # truncated
    args = ["generate", str(tmp_path / "out"), "--run", str(trained_run["run_dir"]), "--mode", "inpaint",
            "--sources", str(good), "--num-per-type", "1", "--steps", "2", "--no-progress"]

    import defect_ds.generate.cli as generate_cli

    real_build = generate_cli.build_pipeline
    monkeypatch.setattr(generate_cli, "build_pipeline",
                        lambda **kw: (_ for _ in ()).throw(AssertionError("the pipeline loaded first")))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(good / "good_1.png") in err and "truncated" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(generate_cli, "build_pipeline", real_build)
    assert main([*args, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable input file(s)" in out and "good_1.png" in out
    sources = {json.loads((f / "json").read_text())["generation"]["source_image"]
               for f in _samples(tmp_path / "out").values()}
    assert sources and all("good_0" in s for s in sources)  # only the readable source was used


def test_keep_recognisable_judges_every_pair_and_keeps_the_shards_to_the_kept_ones(trained_run, tmp_path, capsys):
    good = _object_image(11)
    scratch = np.zeros((64, 64), np.uint8)
    scratch[28:31, 20:44] = 1
    shot = _object_image(3)
    shot[scratch.astype(bool)] = 255
    data = _write_shots(tmp_path / "shots", [("scratch", shot, scratch), ("good", good, np.zeros_like(scratch))])
    out = tmp_path / "gen"
    args = ["generate", str(out), "--run", str(trained_run["run_dir"]), "--mode", "inpaint", "--sources", str(data),
            "--masks", "augmented", "--defect-types", "scratch", "--num-per-type", "3", "--steps", "1",
            "--no-progress", "--keep-recognisable", "--judge-steps", "3"]
    assert main([a if a != "augmented" else "procedural" for a in args]) == 2  # no shots named: nothing written
    assert "--keep-recognisable needs the shots" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--data", str(data), "--judge-threshold", "0.001"]) == 0
    report = json.loads((out / "recognisability.json").read_text())
    assert report["judge"]["steps"] == 3 and report["judge"]["data"] == str(data.resolve())
    assert report["per_type"]["scratch"]["pairs"] == 3 == len(report["samples"])
    kept = sorted(k for k, s in report["samples"].items() if s["kept"])
    assert sorted(_samples(out)) == kept and len(kept) == report["per_type"]["scratch"]["kept"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["recognisability_filter"]["per_type"] == report["per_type"]
    assert sum(i["counts"].get("scratch", 0) for infos in manifest["shards"].values() for i in infos) == len(kept)
    assert "keep-recognisable: scratch kept" in capsys.readouterr().out
