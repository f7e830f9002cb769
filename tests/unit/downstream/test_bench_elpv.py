"""benchmarks/elpv.py's own pieces on a fake ELPV folder: the fine-tune set holds the defect shots alone, the
strength rule picks the lowest strength near the best, and recognisability scores generated cells and the
untouched sources with classifiers trained on the shots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defect_ds.cli import main
from defect_ds.data.reader import iter_dataset
from defect_ds.data.sample import GOOD
from defect_ds.data.shards import ShardWriter, build_manifest, read_manifest, write_manifest



@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/elpv.py")


@pytest.fixture(scope="module")
def shots(make_elpv, tmp_path_factory):
    data = tmp_path_factory.mktemp("elpv") / "data"
    assert main(["prepare", "elpv", str(make_elpv(tmp_path_factory.mktemp("raw"))), str(data), "--resolution-px", "32",
                 "--no-progress"]) == 0
    split = tmp_path_factory.mktemp("split")
    assert main(["downstream", "split", str(data), str(split), "--shots", "2"]) == 0
    return split / "shots"


def test_defect_only_keeps_the_shots_and_drops_the_good_cells(bench, shots, tmp_path):
    bench.defect_only(shots, tmp_path / "fine")
    kept = list(iter_dataset(tmp_path / "fine"))
    source = [item for item in iter_dataset(shots) if item["meta"]["defect_type"] != GOOD]
    assert sorted(i["key"] for i in kept) == sorted(i["key"] for i in source) and len(kept) == 2
    assert {i["image"] for i in kept} == {i["image"] for i in source}  # the same bytes
    assert read_manifest(tmp_path / "fine")["defect_tokens"] == {"defect": "sks_defect"}


def test_the_lowest_strength_near_the_best_is_chosen(bench):
    scores = {"0.5": {"called_defective": 0.2}, "0.7": {"called_defective": 0.86}, "0.85": {"called_defective": 0.9},
              "1.0": {"called_defective": 0.88}, "sources": {"called_defective": 0.0}}
    assert bench.choose_strength(scores, tolerance=0.05) == 0.7
    assert bench.choose_strength(scores, tolerance=0.0) == 0.85


def fake_generated(root: Path, shots: Path, darken: bool) -> Path:
    """A `generate` output stand-in: each training good cell again (darkened by a crack-like bar when `darken`),
    its source recorded as generate records it."""
    out = root / "shards"
    out.mkdir(parents=True)
    writer = ShardWriter(out)
    from io import BytesIO

    from PIL import Image
    for item in iter_dataset(shots):
        if item["meta"]["defect_type"] != GOOD:
            continue
        image = np.array(Image.open(BytesIO(item["image"])).convert("RGB"))
        if darken:
            image[14:17, 4:-4] = 20
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        meta = {"defect_type": "defect", "generation": {"source_image": f"{shots}:{item['key']}"}}
        full = BytesIO()
        Image.fromarray(np.full(image.shape[:2], 255, np.uint8)).save(full, format="PNG")
        writer.write("train", {"__key__": "gen-" + item["key"], "image.png": buffer.getvalue(),
                               "mask.png": full.getvalue(), "caption.txt": b"x", "json": json.dumps(meta).encode()},
                     "defect")
    write_manifest(out, build_manifest(writer.close(), created_by="test", defect_tokens={"defect": "sks_defect"}))
    return out


def test_recognisability_scores_each_strength_and_the_sources(bench, shots, tmp_path):
    generated = {0.5: fake_generated(tmp_path / "a", shots, darken=False),
                 1.0: fake_generated(tmp_path / "b", shots, darken=True)}
    scores = bench.recognisability(shots, generated, 32, seeds=1, steps=30)
    assert set(scores) == {"0.5", "1.0", "sources"}
    assert scores["0.5"]["cells"] == scores["sources"]["cells"] > 0
    for r in scores.values():
        assert 0 <= r["mean_probability"] <= 1 and 0 <= r["called_defective"] <= 1
    # the untouched cells are the sources themselves: the same classifier gives them the same probabilities
    assert scores["0.5"]["mean_probability"] == pytest.approx(scores["sources"]["mean_probability"], abs=1e-4)


def test_seconds_per_step_read_from_a_base_log(bench, tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [{"stage": "vae", "step": 25, "time_s": 50.0}, {"stage": "vae", "step": 50, "time_s": 100.0},
               {"stage": "unet", "step": 25, "time_s": 175.0}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert bench.steps_per_second(log) == {"vae": 2.0, "unet": 3.0}


@pytest.fixture(scope="module")
def codec_split(make_elpv, tmp_path_factory):
    """A fake ELPV split with a pool: 40 good and 24 defect cells, 2 shots, half the rest in the pool."""
    cells = [("0.0", t) for t in ("mono", "poly") for _ in range(20)] + [("1.0", t) for t in ("mono", "poly")
                                                                       for _ in range(12)]
    data = tmp_path_factory.mktemp("codec") / "data"
    assert main(["prepare", "elpv", str(make_elpv(tmp_path_factory.mktemp("raw"), cells)), str(data),
                 "--resolution-px", "32", "--no-progress"]) == 0
    split = tmp_path_factory.mktemp("codec-split")
    assert main(["downstream", "split", str(data), str(split), "--shots", "2", "--pool-fraction", "0.5"]) == 0
    return split


def codec_inputs(split: Path):
    from defect_ds.downstream.cli import load_pairs, load_pool

    return load_pool(split, 32), load_pairs(split / "shots", 32, defects=False)


def test_the_halves_split_the_cells_in_two_without_overlap(bench):
    keys = [f"cell{i:03d}" for i in (5, 3, 0, 4, 1, 2, 6)]
    first, second = bench.halves(keys)
    assert sorted([*first, *second]) == list(range(7)) and len(first) == 4 and len(second) == 3
    assert {keys[i] for i in first} == {"cell000", "cell002", "cell004", "cell006"}  # every other one in key order


def test_a_codec_that_changes_nothing_keeps_every_score(bench, codec_split):
    defects, goods = codec_inputs(codec_split)
    r = bench.codec_survival(defects, goods, lambda x: x.copy(), 32, seeds=1, steps=30, resamples=200)
    assert r["scores"]["original"] == r["scores"]["round trip"]
    assert {(c["metric"], c["difference"], c["verdict"]) for c in r["comparisons"]} == {
        ("image_auroc", 0.0, "no detectable difference"), ("image_ap", 0.0, "no detectable difference")}
    assert r["psnr_db"]["defect"] == r["psnr_db"]["good"] > 100  # no error at all
    train, held = r["cells"]["train"], r["cells"]["eval"]
    assert train["defect"] + held["defect"] == len(defects.keys) and train["good"] + held["good"] == len(goods.keys)


def test_a_codec_that_erases_the_cracks_is_worse_than_the_originals(bench, codec_split):
    """Each cell becomes its own median grey: the dark crack, all that tells the fake defect cells apart, is gone."""
    defects, goods = codec_inputs(codec_split)

    def erase(images):
        return np.broadcast_to(np.median(images, axis=(1, 2), keepdims=True), images.shape).astype(np.uint8)

    r = bench.codec_survival(defects, goods, erase, 32, seeds=2, steps=60, resamples=500)
    assert r["scores"]["original"]["image_auroc"] > 0.9
    auroc = next(c for c in r["comparisons"] if c["metric"] == "image_auroc")
    assert auroc["verdict"] == "worse" and auroc["ci_high"] < 0
    assert r["psnr_db"]["defect"] < r["psnr_db"]["good"]  # the crack is what the codec lost


def test_the_base_codec_returns_images_of_the_same_size(bench, tiny_model_dir):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = bench.vae_codec(tiny_model_dir / "vae", batch_size=2)(images)
    assert out.shape == images.shape and out.dtype == np.uint8


def test_the_codec_table_has_a_row_per_size_with_its_verdict(bench, codec_split):
    defects, goods = codec_inputs(codec_split)
    r = bench.codec_survival(defects, goods, lambda x: x.copy(), 32, seeds=1, steps=10, resamples=50)
    lines = bench.codec_markdown({"128": r, "32": r}, 32)
    rows = [line for line in lines if line.startswith("| 32 ") or line.startswith("| 128 ")]
    assert [row.split()[1] for row in rows] == ["32", "128"]
    assert all(row.count("no detectable difference") == 2 for row in rows)


def test_a_resumable_stage_makes_its_folder_and_computes_only_what_it_lacks(bench, tmp_path):
    path = tmp_path / "codec" / "survival.json"  # a fresh work folder: no codec/ yet
    computed = []
    assert bench.resumable_by_key(path, ["64", "96"], lambda k: computed.append(k) or {"px": int(k)}) == {
        "64": {"px": 64}, "96": {"px": 96}}
    assert bench.resumable_by_key(path, ["64", "96", "128"], lambda k: computed.append(k) or {"px": int(k)})["128"]
    assert computed == ["64", "96", "128"]
    assert json.loads(path.read_text())["128"] == {"px": 128}


def test_each_stage_time_is_kept_as_it_ends_so_a_run_that_fails_later_still_reports_it(bench, tmp_path):
    stages = bench.Stages(tmp_path)
    stages.run("base", False, lambda: None)

    def fails() -> None:
        raise SystemExit("stage failed")

    with pytest.raises(SystemExit):
        stages.run("codec", False, fails)
    resumed = bench.Stages(tmp_path)  # the rerun: base is skipped and keeps its time
    resumed.run("base", True, lambda: None)
    resumed.run("codec", False, lambda: None)
    assert list(resumed.times) == ["base", "codec"]
    assert json.loads((tmp_path / "stage-times.json").read_text()).keys() == {"base", "codec"}
