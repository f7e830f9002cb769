"""MVTec and folder importers, the split, captions and tokens, and bad inputs at prepare time."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_ds.cli import main
from defect_ds.data import read_manifest
from defect_ds.data.importers import MAX_CAPTION_CHARS, SourceItem, assign_splits, load_item
from defect_ds.data.sample import BadSampleError, open_image


def png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


def rgb(size=(24, 32), value=100) -> np.ndarray:
    return np.full((*size, 3), value, np.uint8)


def blob_mask(size=(24, 32)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[5:10, 6:12] = 255
    return mask


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    for i in range(4):
        png(root / "pill/train/good" / f"{i:03d}.png", rgb(value=90 + i))
    png(root / "pill/test/good/000.png", rgb())
    for defect, n in (("crack", 3), ("color", 2)):
        for i in range(n):
            png(root / f"pill/test/{defect}/{i:03d}.png", rgb(value=10 * i), "L" if i == 0 else "RGBA")
            png(root / f"pill/ground_truth/{defect}/{i:03d}_mask.png", blob_mask())
    return root


def test_mvtec_import(mvtec, tmp_path):
    out = tmp_path / "out"
    assert main(["prepare", "mvtec", str(mvtec), "--category", "pill", str(out), "--val-fraction", "0.34",
                 "--no-progress"]) == 0
    m = read_manifest(out)
    assert m["defect_tokens"] == {"color": "sks_color", "crack": "sks_crack"}
    assert m["counts"] == {"train": {"color": 1, "crack": 2, "good": 3}, "val": {"color": 1, "crack": 1, "good": 2}}
    rows = [json.loads(line) for line in (out / "splits.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train", "val"}
    from defect_ds.config import DataConfig
    from defect_ds.data.loader import build_loader

    cfg = DataConfig(train_shards=str(out), resolution_px=16, hflip=False)
    batches = list(build_loader(cfg, micro_batch_size=6, rank=0, world_size=1, seed=0, epoch=0))
    b = batches[0]
    assert b["pixel_values"].shape == (6, 3, 16, 16)  # grayscale and RGBA sources became RGB
    for mask, t, caption in zip(b["mask"], b["defect_type"], b["caption"]):
        assert (mask.sum() > 0) == (t != "good")
        assert caption == ("a photo of a pill" if t == "good" else f"a photo of a pill with a sks_{t}")


def test_mvtec_missing_ground_truth_names_the_file(mvtec, tmp_path, capsys):
    (mvtec / "pill/ground_truth/crack/001_mask.png").unlink()
    assert main(["prepare", "mvtec", str(mvtec), "--category", "pill", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "001_mask.png" in capsys.readouterr().err and not (tmp_path / "o" / "manifest.json").exists()
    assert main(["prepare", "mvtec", str(mvtec), "--category", "pill", str(tmp_path / "o"), "--no-progress",
                 "--skip-bad", "--overwrite"]) == 0
    skipped = read_manifest(tmp_path / "o")["skipped"]
    assert len(skipped) == 1 and "001_mask.png" in skipped[0]["reason"]


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "folder"
    png(d / "img/a.png", rgb())
    png(d / "img/a_mask.png", blob_mask())
    png(d / "img/b.png", rgb(value=50), "LA")
    png(d / "img/c.png", rgb(value=70))
    png(d / "img/d.png", rgb(value=30))
    return d


def test_folder_csv_templates_tokens_and_missing_masks(tmp_path, capsys):
    d = _folder(tmp_path)
    (d / "m.csv").write_text("image,mask,defect_type,category\n"
                             "img/a.png,img/a_mask.png,dent,can\n"
                             "img/b.png,,dent,can\n"
                             "img/c.png,,good,can\n"
                             "img/d.png,,good,\n")
    (d / "t.json").write_text(json.dumps({"dent": "an image of a {category}, {token} visible"}))
    base = ["prepare", "folder", str(d / "m.csv"), "--val-fraction", "0", "--no-progress",
            "--caption-templates", str(d / "t.json"), "--token-prefix", "<", "--token", "dent=<dnt>"]
    assert main(base + [str(tmp_path / "x")]) == 2  # a defect image without a mask needs --missing-mask
    assert "--missing-mask" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "o"), "--missing-mask", "full"]) == 0
    assert "1 defect image(s) had no mask and got an all-ones mask" in capsys.readouterr().err
    from defect_ds.config import DataConfig
    from defect_ds.data.loader import build_loader

    cfg = DataConfig(train_shards=str(tmp_path / "o"), resolution_px=16)
    batch = next(iter(build_loader(cfg, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0)))
    by_key = {k: (m, c) for k, m, c in zip(batch["key"], batch["mask"], batch["caption"])}
    assert by_key["img_b"][0].min() == 1  # all ones, said explicitly
    assert by_key["img_c"][0].max() == 0 and by_key["img_a"][0].sum() > 0
    assert by_key["img_a"][1] == "an image of a can, <dnt> visible"
    assert by_key["img_d"][1] == "a photo of a object"  # default category


def test_folder_jsonl_caption_and_empty_caption(tmp_path):
    d = _folder(tmp_path)
    (d / "m.jsonl").write_text(json.dumps({"image": "img/a.png", "mask": "img/a_mask.png", "defect_type": "dent",
                                           "caption": "dented can sks_dent"}) + "\n"
                               + json.dumps({"image": "img/c.png", "defect_type": "good", "caption": " "}) + "\n")
    assert main(["prepare", "folder", str(d / "m.jsonl"), str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["prepare", "folder", str(d / "m.jsonl"), str(tmp_path / "o"), "--no-progress", "--skip-bad",
                 "--val-fraction", "0"]) == 0
    m = read_manifest(tmp_path / "o")
    assert m["counts"]["train"] == {"dent": 1} and "empty caption" in m["skipped"][0]["reason"]


def test_folder_csv_blank_caption_cell_uses_the_template(tmp_path):
    d = _folder(tmp_path)
    (d / "m.csv").write_text("image,mask,defect_type,caption\n"
                             "img/a.png,img/a_mask.png,dent,dented can sks_dent\n"
                             "img/c.png,,good,\n"  # blank cell: no caption given
                             'img/d.png,,good,"  "\n')  # spaces: a caption given, but empty
    out = tmp_path / "o"
    assert main(["prepare", "folder", str(d / "m.csv"), str(out), "--no-progress", "--skip-bad",
                 "--val-fraction", "0"]) == 0
    m = read_manifest(out)
    assert m["counts"]["train"] == {"dent": 1, "good": 1}
    assert [s["key"] for s in m["skipped"]] == ["img_d"] and "empty caption" in m["skipped"][0]["reason"]
    from defect_ds.config import DataConfig
    from defect_ds.data.loader import build_loader

    cfg = DataConfig(train_shards=str(out), resolution_px=16)
    batch = next(iter(build_loader(cfg, micro_batch_size=2, rank=0, world_size=1, seed=0, epoch=0)))
    captions = dict(zip(batch["key"], batch["caption"]))
    assert captions == {"img_a": "dented can sks_dent", "img_c": "a photo of a object"}


@pytest.mark.parametrize("length", [MAX_CAPTION_CHARS + 1, 20 << 20])  # over the limit; over csv's own
def test_a_caption_too_long_is_one_sentence_naming_the_row(tmp_path, capsys, length):
    d = _folder(tmp_path)
    (d / "m.csv").write_text("image,defect_type,caption\nimg/c.png,good,a can\n"
                             f"img/a.png,dent,{'x' * length}\n")
    assert main(["prepare", "folder", str(d / "m.csv"), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and len(err) < 400, err[:400]
    if length > 131072:
        assert f"{d / 'm.csv'} line 3 cannot be read as CSV" in err and f"at most {MAX_CAPTION_CHARS}" in err
    else:
        assert f"{d / 'm.csv'} row 2 has a caption of {length} characters" in err
    (d / "m.jsonl").write_text(json.dumps({"image": "img/a.png", "defect_type": "dent", "caption": "x" * length}))
    assert main(["prepare", "folder", str(d / "m.jsonl"), str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"row 1 has a caption of {length} characters" in capsys.readouterr().err


def test_skip_bad_splits_only_what_loaded(tmp_path):
    # the inputs a split over all of them would send to val (and dent's only train pick) are unreadable
    items = [(f"img_s{i}", "scratch") for i in range(10)] + [("img_e0", "dent"), ("img_e1", "dent")]
    planned = assign_splits(items, val_fraction=0.3, seed=0)
    bad = {k for k, t in items if (planned[k] == "val") == (t == "scratch")}
    assert len(bad) == 4
    d = tmp_path / "folder"
    for key, defect_type in items:
        image = png(d / f"img/{key[4:]}.png", rgb())
        if key in bad:
            image.write_text("not an image")
    (d / "m.csv").write_text("image,defect_type\n" + "".join(f"img/{k[4:]}.png,{t}\n" for k, t in items))
    out = tmp_path / "o"
    assert main(["prepare", "folder", str(d / "m.csv"), str(out), "--no-progress", "--skip-bad",
                 "--missing-mask", "full", "--val-fraction", "0.3"]) == 0
    m = read_manifest(out)
    assert {s["key"] for s in m["skipped"]} == bad
    # stratified over the 7 + 1 that loaded: round(7 x 0.3) = 2 scratch in val, the single dent in train
    assert m["counts"] == {"train": {"dent": 1, "scratch": 5}, "val": {"scratch": 2}}


def _item(tmp_path, image: Path, mask: Path | None = None, defect_type="dent") -> SourceItem:
    return SourceItem("k", image, mask, "thing", defect_type)


def test_bad_inputs_are_named(tmp_path):
    good = png(tmp_path / "ok.png", rgb())
    mask = png(tmp_path / "ok_mask.png", blob_mask())
    small_mask = png(tmp_path / "small_mask.png", blob_mask((12, 16)))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (_item(tmp_path, good, tmp_path / "absent.png"), "mask .*absent.png of .*ok.png does not exist"),
        (_item(tmp_path, good, small_mask), "small_mask.png is 16x12 but its image"),
        (_item(tmp_path, truncated, mask), "trunc.png is truncated or corrupt"),
        (_item(tmp_path, text, mask), "notes.png is not an image"),
        (_item(tmp_path, tmp_path / "gone.png", mask), "gone.png does not exist"),
    ]
    for item, message in cases:
        with pytest.raises(BadSampleError, match=message):
            load_item(item, "a caption", missing_mask=None)
    with pytest.raises(BadSampleError, match="empty caption"):
        load_item(_item(tmp_path, good, mask), "  ", missing_mask=None)
    bomb = png(tmp_path / "bomb.png", np.zeros((300, 300), np.uint8))
    with pytest.raises(BadSampleError, match="bomb.png is 300x300 pixels.*decompression bomb"):
        load_item(_item(tmp_path, bomb, None, "good"), "c", missing_mask=None, max_pixels=10_000)

def test_our_pixel_limit_decides_not_pils(tmp_path, monkeypatch):
    image = png(tmp_path / "wide.png", np.zeros((300, 300), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit far below ours
    assert open_image(image, "wide.png", max_pixels=10**12).size == (300, 300)
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted only while the header was read
    with pytest.raises(BadSampleError, match="wide.png is 300x300 pixels, more than the limit of 89999"):
        open_image(image, "wide.png", max_pixels=89_999)


def test_raised_limit_admits_an_image_above_pils_default(tmp_path):
    # 90 M pixels, just over PIL's default of ~89.5 M; one bit per pixel and one colour keep the PNG at ~11 kB
    buf = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buf, format="PNG")
    assert 10_000 * 9_000 > Image.MAX_IMAGE_PIXELS
    assert open_image(buf.getvalue(), "huge.png", max_pixels=100_000_000).size == (10_000, 9_000)
    with pytest.raises(BadSampleError, match="huge.png is 10000x9000 pixels"):
        open_image(buf.getvalue(), "huge.png")  # the default limit, 67 M pixels, still refuses it


def test_mask_is_binarised_and_rgba_image_becomes_rgb(tmp_path):
    soft = blob_mask() // 2 + 100  # 100 outside, 227 inside: anti-aliased or JPEG-ish
    image = np.dstack([rgb(), np.full((24, 32), 255, np.uint8)])
    sample = load_item(_item(tmp_path, png(tmp_path / "a.png", image), png(tmp_path / "m.png", soft)), "c",
                       missing_mask=None)
    assert sample.image.mode == "RGB" and set(np.unique(np.asarray(sample.mask)).tolist()) == {0, 255}
    assert (np.asarray(sample.mask) > 0).sum() == (blob_mask() > 0).sum()


def test_split_is_seeded_stratified_and_order_independent():
    items = [(f"s{i}", "scratch") for i in range(10)] + [(f"c{i}", "crack") for i in range(5)] + [("r0", "rare")]
    a = assign_splits(items, val_fraction=0.2, seed=0)
    b = assign_splits(list(reversed(items)), val_fraction=0.2, seed=0)
    c = assign_splits(items, val_fraction=0.2, seed=1)
    assert a == b and a != c
    val = Counter(t for k, t in items if a[k] == "val")
    assert val == {"scratch": 2, "crack": 1}  # per type, and the single rare one stays in train
