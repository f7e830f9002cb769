"""`defect-ds evaluate` offline: FID/KID/IS through torch-fidelity with a random-init Inception file,
the feature cache key, the missing-weights error, mask localisation and the diversity scores."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_ds.cli import main
from defect_ds.data.masks import overlay_mask
from defect_ds.evaluate.metrics import (cluster_centres, evaluate, ic_lpips, mask_localisation, masked_pixel_diversity,
                                        pixel_distance, write_random_inception_weights)
from defect_ds.evaluate.report import markdown_report
from defect_ds.generate.output import write_sample
from defect_ds.generate.spec import GenerationSettings, SampleSpec

TYPES = ("scratch", "stain")
PER_TYPE = 6


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("weights") / "inception-random.pth", seed=0)


def _noise_images(type_index: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lo = 40 * type_index
    return [(lo + rng.integers(0, 156, (64, 64, 3))).astype(np.uint8) for _ in range(PER_TYPE)]


def _smooth_images(type_index: int) -> list[np.ndarray]:
    """Flat colour ramps: nothing like the noise textures."""
    ramp = np.linspace(0, 1, 64)[None, :, None]
    return [(ramp * np.array([200, 120 + 20 * i, 60 * type_index])).repeat(64, 0).astype(np.uint8)
            for i in range(PER_TYPE)]


def _mask(i: int) -> np.ndarray:
    mask = np.zeros((64, 64), np.uint8)
    mask[16 + i:32 + i, 20:40] = 1
    return mask


def _write_generated(folder: Path, images: dict[str, list[np.ndarray]]) -> Path:
    """A `defect-ds generate`-style folder, written by the generator's own writer."""
    settings = GenerationSettings()
    for defect_type, imgs in images.items():
        for i, image in enumerate(imgs):
            spec = SampleSpec(key=f"{defect_type}-{i:06d}", defect_type=defect_type, token=f"sks_{defect_type}",
                              prompt=f"a photo with sks_{defect_type}", seed=i, category="pill", mask=_mask(i),
                              mask_origin="test")
            write_sample(folder, spec, image, settings)
    return folder


def _write_shards(folder: Path, images: dict[str, list[np.ndarray]]) -> Path:
    """Real images as a training-format WebDataset shard."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for defect_type, imgs in images.items():
            for i, image in enumerate(imgs):
                png, mpng = io.BytesIO(), io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                Image.fromarray(_mask(i) * 255).save(mpng, format="PNG")
                sink.write({"__key__": f"{defect_type}_{i}", "image.png": png.getvalue(), "mask.png": mpng.getvalue(),
                            "caption.txt": "a photo", "json": {"category": "pill", "defect_type": defect_type,
                                                               "source": "real", "split": "train",
                                                               "size": [64, 64]}})
    return folder


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    a = {t: _noise_images(k, seed=k) for k, t in enumerate(TYPES)}
    b = {t: _smooth_images(k) for k, t in enumerate(TYPES)}
    return {"generated": _write_generated(root / "generated", a), "real_same": _write_shards(root / "real_same", a),
            "real_other": _write_shards(root / "real_other", b), "root": root}


def _cache_files(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("*.safetensors")}


def test_fid_is_zero_for_copies_and_large_for_different_sets(image_sets, inception_weights, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    kw = dict(inception_weights=str(inception_weights), cache_dir=cache, kid_subset_size=4, kid_subsets=20)
    same = evaluate(image_sets["generated"], image_sets["real_same"], tmp_path / "same", **kw)
    n_cached = len(_cache_files(cache))
    other = evaluate(image_sets["generated"], image_sets["real_other"], tmp_path / "other", **kw)

    for group in [same["overall"], *same["per_defect_type"].values()]:
        assert abs(group["fid"]) < 1e-3
    for t in TYPES:
        s, o = same["per_defect_type"][t], other["per_defect_type"][t]
        assert s["num_generated"] == o["num_real"] == PER_TYPE
        assert o["fid"] > 1.0 and o["fid"] > 1000 * max(abs(s["fid"]), 1e-6)
        assert o["kid_mean"] > s["kid_mean"] + 0.01
        assert s["is_mean"] >= 1.0 and s["is_mean"] == o["is_mean"]  # IS is over the generated set only
    assert other["overall"]["fid"] > 1.0 and other["overall"]["num_real"] == 2 * PER_TYPE
    assert not any("KID subset size lowered" in n for n in same["overall"]["notes"])  # asked for 4 <= 6

    # the cache key is the pixels + the weights: the copy of the generated set hit the generated set's
    # features (so the first run cached only those), the other set added its own
    assert n_cached > 0 and len(_cache_files(cache)) > n_cached
    import torch_fidelity.utils as tfu

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were recomputed although they were cached")

    monkeypatch.setattr(tfu, "get_featuresdict_from_dataset", no_extraction)
    again = evaluate(image_sets["generated"], image_sets["real_other"], tmp_path / "again", **kw)
    assert again["overall"]["fid"] == pytest.approx(other["overall"]["fid"])
    monkeypatch.undo()

    other_weights = write_random_inception_weights(tmp_path / "other-weights.pth", seed=1)
    before = _cache_files(cache)
    evaluate(image_sets["generated"], image_sets["real_same"], tmp_path / "w2",
             **{**kw, "inception_weights": str(other_weights)})
    assert len(_cache_files(cache) - before) > 0  # new weights, new key

    # report files: JSON with both groups, markdown table, grid with a generated and a real row per type
    report = json.loads((tmp_path / "other" / "report.json").read_text())
    assert set(report["per_defect_type"]) == set(TYPES) and report["overall"]["fid"] == other["overall"]["fid"]
    md = (tmp_path / "other" / "report.md").read_text()
    assert "| defect type |" in md and "| scratch |" in md and "**overall**" in md and "grid.png" in md
    grid = Image.open(tmp_path / "other" / "grid.png")
    assert grid.height > 4 * 64  # 2 types x (generated row + real row)


def test_changing_one_image_changes_the_cache_key(image_sets, inception_weights, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(inception_weights=str(inception_weights), cache_dir=cache, kid_subset_size=3, kid_subsets=5)
    images = {"scratch": _noise_images(0, seed=0)}
    gen = _write_generated(tmp_path / "gen1", images)
    evaluate(gen, gen, tmp_path / "e1", **kw)
    before = _cache_files(cache)
    images["scratch"][2][0, 0] ^= 1  # one bit of one pixel
    gen2 = _write_generated(tmp_path / "gen2", images)
    evaluate(gen2, gen2, tmp_path / "e2", **kw)
    assert len(_cache_files(cache) - before) > 0


def test_missing_inception_weights_says_where_to_put_them(image_sets, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DEFECT_DS_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    rc = main(["evaluate", str(image_sets["generated"]), "--real", str(image_sets["real_same"]),
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--inception-weights" in err and "DEFECT_DS_INCEPTION_WEIGHTS" in err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and str(tmp_path / "torch-home") in err
    assert not (tmp_path / "e").exists()  # failed before doing anything

    rc = main(["evaluate", str(image_sets["generated"]), "--real", str(image_sets["real_same"]),
               "--inception-weights", str(tmp_path / "nope.pth")])
    assert rc == 2 and "nope.pth" in capsys.readouterr().err


def test_a_full_disk_keeps_the_old_report_and_is_one_sentence(image_sets, inception_weights, tmp_path, capsys,
                                                               full_disk):
    out = tmp_path / "e"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}\n')
    full_disk.fill()
    rc = main(["evaluate", str(image_sets["generated"]), "--real", str(image_sets["real_same"]), "--out", str(out),
               "--inception-weights", str(inception_weights), "--cache-dir", str(tmp_path / "cache"),
               "--kid-subset-size", "4", "--kid-subsets", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and re.fullmatch(rf"defect-ds evaluate: error: No space left while writing {re.escape(str(out))}"
                                    r"/\S+; nothing there was changed; free space and rerun\.", err), err
    assert (out / "report.json").read_text() == '{"old": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no cut picture or temporary file


def test_mask_localisation_is_the_share_of_change_inside_the_mask():
    source = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 1
    inside = source.copy()
    inside[:2] += 10
    assert mask_localisation(inside, source, mask) == 1.0
    half = inside.copy()
    half[6:] -= 10  # as much change outside as inside
    assert mask_localisation(half, source, mask) == pytest.approx(0.5)
    assert mask_localisation(source, source, mask) is None  # no change, no share


def test_evaluate_reports_localisation_and_diversity_unavailable_without_lpips(inception_weights, tmp_path):
    settings = GenerationSettings(mode="inpaint")
    rng = np.random.default_rng(0)
    for i in range(3):
        source = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
        image = source.copy()
        image[_mask(i).astype(bool)] = 255  # changes inside the mask only
        if i == 2:
            image[60:, :] = 0  # and this one also outside
        spec = SampleSpec(key=f"scratch-{i:06d}", defect_type="scratch", token="sks", prompt="p", seed=i,
                          category="pill", mask=_mask(i), mask_origin="test", source=source)
        write_sample(tmp_path / "gen", spec, image, settings)
    report = evaluate(tmp_path / "gen", tmp_path / "gen", tmp_path / "e", inception_weights=str(inception_weights),
                      cache_dir=tmp_path / "cache", kid_subset_size=2, kid_subsets=3)
    group = report["per_defect_type"]["scratch"]
    assert 0.5 < group["mask_localisation"] < 1.0  # two samples at 1.0, one below
    assert group["ic_lpips"] is None and "--lpips-weights" in group["ic_lpips_unavailable"]
    assert group["masked_pixel_diversity"] > 0
    assert any("IC-LPIPS not computed" in n for n in report["notes"])
    masks = report["masks"]["scratch"]  # the generated masks against the real ones (here the same)
    assert masks["generated"]["num_masks"] == 3 and masks["generated"] == masks["real"]
    assert (tmp_path / "e" / "masks.png").is_file() and "## Masks: generated against real" in (
        tmp_path / "e" / "report.md").read_text()

    partial = tmp_path / "lpips"
    partial.mkdir()
    report = evaluate(tmp_path / "gen", tmp_path / "gen", tmp_path / "e2", inception_weights=str(inception_weights),
                      lpips_weights=str(partial), cache_dir=tmp_path / "cache", kid_subset_size=2, kid_subsets=3)
    assert "weights-vgg16-lpips.pth" in report["overall"]["ic_lpips_unavailable"]


def test_ic_lpips_clusters_by_nearest_centre_and_averages_within():
    def flat(v):
        return np.full((8, 8, 3), v, np.uint8)

    centres = [flat(0), flat(255)]
    generated = [flat(10), flat(30), flat(240), flat(250), flat(120)]  # 120 is nearer black
    # black cluster {10, 30, 120}: pairs 20, 110, 90; white cluster {240, 250}: pair 10
    expected = (np.mean([20, 110, 90]) / 255 + 10 / 255) / 2
    assert ic_lpips(generated, centres, pixel_distance) == pytest.approx(expected, rel=1e-5)
    assert ic_lpips([flat(10), flat(250)], centres, pixel_distance) is None  # no cluster of two


def test_cluster_centres_are_a_seeded_sample_across_the_real_set():
    real = [np.full((4, 4, 3), v, np.uint8) for v in range(40)]
    centres = cluster_centres(real, k=10, seed=0)
    values = [int(c[0, 0, 0]) for c in centres]
    assert len(set(values)) == 10 and values == sorted(values)
    assert max(values) >= 10  # not the first 10 in key order
    assert values == [int(c[0, 0, 0]) for c in cluster_centres(real, k=10, seed=0)]  # the same every run
    assert cluster_centres(real[:3], k=10) == real[:3]  # fewer than k: all of them


def test_report_md_shows_localisation_before_compositing_and_group_notes():
    group = {"num_generated": 4, "num_real": 6, "fid": 12.5, "kid_mean": 0.1, "kid_std": 0.01, "is_mean": 1.5,
             "is_std": 0.1, "mask_localisation": 1.0, "mask_localisation_before_composite": 0.625,
             "ic_lpips": None, "masked_pixel_diversity": 0.2,
             "notes": ["KID subset size lowered from 1000 to 4 (the smaller set's size)"]}
    report = {"generated": "g", "real": "r", "per_defect_type": {"scratch": group},
              "overall": {**group, "notes": ["FID from fewer than 2048 images per side (4) is biased upward"]},
              "notes": ["IC-LPIPS not computed: no LPIPS weights"]}
    md = markdown_report(report, [])
    header = next(line for line in md.splitlines() if line.startswith("| defect type"))
    row = next(line for line in md.splitlines() if line.startswith("| scratch"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert cells[columns.index("mask localisation before composite ↑")] == "0.625"
    assert "- scratch: KID subset size lowered from 1000 to 4" in md
    assert "- overall: FID from fewer than 2048" in md and "- IC-LPIPS not computed" in md


def test_masked_pixel_diversity_looks_inside_masks_only():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[6:] = 255  # differs only outside the masks
    m = np.zeros((8, 8), np.uint8)
    m[:4] = 1
    assert masked_pixel_diversity([a, b], [m, m]) == 0.0
    c = a.copy()
    c[:2] = 255  # half of the mask differs fully
    assert masked_pixel_diversity([a, c], [m, m]) == pytest.approx(0.5)


@pytest.mark.slow
def test_ic_lpips_with_local_lpips_weights(image_sets, inception_weights, tmp_path):
    """The LPIPS network loads from two local files without any download (random weights here)."""
    import torchvision

    folder = tmp_path / "lpips"
    folder.mkdir()
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), folder / "vgg16-397923af.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(lins, folder / "weights-vgg16-lpips.pth")
    report = evaluate(image_sets["generated"], image_sets["real_other"], tmp_path / "e",
                      inception_weights=str(inception_weights), lpips_weights=str(folder),
                      cache_dir=tmp_path / "cache", kid_subset_size=4, kid_subsets=5)
    for t in TYPES:
        assert report["per_defect_type"][t]["ic_lpips"] > 0


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a crafted weights file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_weights_file_is_never_unpickled(image_sets, inception_weights, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pth"
    state = torch.load(inception_weights, weights_only=True)
    torch.save({**state, "payload": _RunsCode(marker)}, crafted)  # real weights plus a payload
    rc = main(["evaluate", str(image_sets["generated"]), "--real", str(image_sets["real_same"]),
               "--inception-weights", str(crafted), "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.count("\n") == 1 and str(crafted) in err and "not unpickled" in err
    assert not (tmp_path / "e").exists()

    lpips = tmp_path / "lpips"
    lpips.mkdir()
    torch.save({"w": _RunsCode(marker)}, lpips / "weights-vgg16-lpips.pth")
    torch.save({}, lpips / "vgg16-397923af.pth")
    from defect_ds.evaluate.metrics import load_lpips

    with pytest.raises(ValueError, match="not unpickled"):
        load_lpips(lpips, cuda=False)
    assert not marker.exists()

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)  # tensors, but not Inception's
    rc = main(["evaluate", str(image_sets["generated"]), "--real", str(image_sets["real_same"]),
               "--inception-weights", str(wrong), "--out", str(tmp_path / "e")])
    assert rc == 2 and "does not hold torch-fidelity's Inception weights" in capsys.readouterr().err


def test_the_feature_cache_holds_tensors_only(image_sets, inception_weights, tmp_path, monkeypatch):
    """Entries are .safetensors; torch-fidelity's pickled .pt cache is never written nor read."""
    cache = tmp_path / "cache"
    kw = dict(inception_weights=str(inception_weights), cache_dir=cache, kid_subset_size=4, kid_subsets=5)
    first = evaluate(image_sets["generated"], image_sets["real_same"], tmp_path / "e1", **kw)
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert files and all(f.endswith("-features.safetensors") for f in files), files
    with open(cache / files[0], "rb") as f:  # a safetensors header (8-byte length, JSON), not a pickle
        length = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(length))

    import torch_fidelity.utils as tfu

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append((str(f), k.get("weights_only"))) or
                        real_load(f, *a, **k))
    monkeypatch.setattr(tfu, "get_featuresdict_from_dataset",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("cached features recomputed")))
    again = evaluate(image_sets["generated"], image_sets["real_same"], tmp_path / "e2", **kw)
    assert again["overall"]["is_mean"] == pytest.approx(first["overall"]["is_mean"])
    # the user's weights file is read as tensors only, and nothing of the cache is torch.load-ed at all
    assert (str(inception_weights), True) in loads
    assert all(w is True for f, w in loads if f == str(inception_weights) or f.startswith(str(cache))), loads


def test_the_outline_leaves_a_one_pixel_defect_visible():
    image = np.full((8, 8, 3), 100, np.uint8)
    image[2:6, 4] = 255  # a one-pixel-wide scratch
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 4] = 1
    out = overlay_mask(image, mask, cell_px=16)
    assert out.shape == (16, 16, 3)
    assert (out[4:12, 8:10] == 255).all()  # the scratch, enlarged, untouched
    assert (out[4:12, 7] == (255, 40, 40)).all() and (out[4:12, 10] == (255, 40, 40)).all()  # outline beside it
    assert (out[0, 0] == 100).all()  # far from the mask: the image
