"""`defect-ds downstream`: the split keeps the sides apart, the arms draw what they say, the scores are
scikit-learn's on the right pixels, and bad input gets one sentence."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from defect_ds.cli import main
from defect_ds.downstream.arms import ArmSampler, Pairs, jitter, paste
from defect_ds.downstream.scores import score, score_by_type
from defect_ds.downstream.split import choose
from defect_ds.data.reader import iter_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert main(["prepare", "synthetic", str(out), "--resolution-px", "32", "--per-defect", "3",
                 "--good-per-category", "4", "--categories", "pill", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def split_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    assert main(["downstream", "split", str(data), str(out)]) == 0
    return out


def test_choose_takes_the_first_third_by_key_and_no_key_twice():
    by_type = {"scratch": [f"s{i}" for i in (5, 3, 1, 0, 4, 2)], "good": [f"g{i}" for i in range(10)]}
    train, test = choose(by_type, shots=None, test_good_fraction=0.5)
    assert train["scratch"] == ["s0", "s1"] and test["scratch"] == ["s2", "s3", "s4", "s5"]
    assert len(test["good"]) == 5 and not set(train["good"]) & set(test["good"])
    train, test = choose(by_type, shots=1, test_good_fraction=0.5)
    assert train["scratch"] == ["s0"]


def test_choose_refuses_a_type_with_one_image():
    with pytest.raises(ValueError, match="'crack' has 1 image"):
        choose({"crack": ["c0"], "good": ["g0", "g1"]}, shots=None, test_good_fraction=0.5)


def test_split_writes_disjoint_training_shards(split_dir):
    record = json.loads((split_dir / "split.json").read_text())
    shot_keys = {item["key"] for item in iter_dataset(split_dir / "shots")}
    test_keys = {item["key"] for item in iter_dataset(split_dir / "test")}
    assert shot_keys and test_keys and not shot_keys & test_keys
    assert record["shots_per_type"] == {"crack": 1, "scratch": 1, "spot": 1}
    assert shot_keys == {k for keys in record["shots"].values() for k in keys}
    manifest = json.loads((split_dir / "shots" / "manifest.json").read_text())
    assert manifest["defect_tokens"]["spot"] == "sks_spot" and manifest["shards"]["train"]


def test_paste_lands_the_whole_defect_on_the_object():
    rng = np.random.default_rng(0)
    shot, shot_mask = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)
    shot_mask[2:5, 2:9] = 1
    shot[shot_mask == 1] = 200
    good = np.full((32, 32, 3), 50, np.uint8)
    region = np.zeros((32, 32), bool)
    region[10:28, 10:28] = True
    for _ in range(20):
        image, mask = paste(shot, shot_mask, good, region, rng)
        assert set(np.unique(mask)) == {0, 1} and mask.sum() == shot_mask.sum()
        assert region[mask == 1].all()
        assert (image[mask == 1] == 200).all() and (image[mask == 0] == 50).all()


def test_jitter_keeps_masks_binary_and_aligned():
    rng = np.random.default_rng(1)
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 12:16] = 1
    image[mask == 1] = 255
    for _ in range(10):
        out_image, out_mask = jitter(image, mask, rng)
        assert set(np.unique(out_mask)) <= {0, 1} and out_mask.any()
        assert out_image[out_mask == 1].mean() > 200  # the defect pixels moved with their mask


def test_arm_samplers_draw_from_their_own_source():
    def pairs(value):
        images = np.full((3, 16, 16, 3), value, np.uint8)
        masks = np.zeros((3, 16, 16), np.uint8)
        masks[:, 6:10, 6:10] = 1
        return Pairs(images, masks, ["spot"] * 3, ["a", "b", "c"])

    shots, generated, goods = pairs(10), pairs(240), np.full((4, 16, 16, 3), 100, np.uint8)
    rng = np.random.default_rng(0)
    real = ArmSampler("real", shots, goods, generated).defect_batch(rng, 8)[0]
    gen = ArmSampler("generated", shots, goods, generated).defect_batch(rng, 8)[0]
    both = ArmSampler("real+generated", shots, goods, generated).defect_batch(rng, 64)[0]
    assert np.median(real) == 10 and np.median(gen) == 240
    centres = both[:, 8, 8, 0]
    assert (centres == 10).any() and (centres == 240).any()
    pasted, masks = ArmSampler("copy-paste", shots, goods, generated).defect_batch(rng, 8)
    assert (pasted[masks == 0] != 10).any() and masks.sum(axis=(1, 2)).min() > 0


def test_scores_are_perfect_for_a_perfect_segmenter_and_chance_for_noise():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[:3, 4:8, 4:8] = 1
    is_defect = masks.reshape(6, -1).any(1)
    perfect = score(masks.astype(np.float32), masks, is_defect)
    assert perfect == {"pixel_ap": 1.0, "pixel_auroc": 1.0, "pixel_f1_max": 1.0, "iou": 1.0, "image_auroc": 1.0}
    noise = score(rng.random(masks.shape).astype(np.float32), masks, is_defect)
    assert noise["pixel_ap"] < 0.2 and 0.35 < noise["pixel_auroc"] < 0.65
    by_type = score_by_type(masks.astype(np.float32), masks, ["spot", "spot", "crack", "good", "good", "good"])
    assert set(by_type) == {"all", "crack", "spot"} and by_type["crack"]["iou"] == 1.0


def test_eval_writes_every_report(split_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["downstream", "eval", str(split_dir), str(out), "--arms", "real,copy-paste,generated",
                 "--generated", str(split_dir / "test"), "--seeds", "2", "--steps", "2", "--batch-size", "4",
                 "--resolution-px", "32", "--no-progress"]) == 0
    results = json.loads((out / "downstream.json").read_text())
    assert set(results["arms"]) == {"real", "copy-paste", "generated"}
    summary = results["arms"]["real"]["summary"]
    assert set(summary["all"]) == {"pixel_ap", "pixel_auroc", "pixel_f1_max", "iou", "image_auroc"}
    assert {"crack", "scratch", "spot"} <= set(summary) and len(results["arms"]["real"]["per_seed"]) == 2
    assert "won" in (out / "downstream.md").read_text()
    assert results["environment"]["device"] and results["environment"]["torch"]
    assert results["generation"] is None  # the test set is not a `defect-ds generate` folder
    assert (out / "downstream.png").stat().st_size > 0 and (out / "predictions.png").stat().st_size > 0


def test_eval_records_how_the_generated_pairs_were_drawn(split_dir, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(split_dir / "test", gen)
    (gen / "generation.json").write_text(json.dumps({"mode": "inpaint", "guidance_scale": 6.0, "export_step": 600}))
    out = tmp_path / "eval"
    assert main(["downstream", "eval", str(split_dir), str(out), "--arms", "generated", "--generated", str(gen),
                 "--seeds", "1", "--steps", "1", "--batch-size", "4", "--resolution-px", "32", "--no-progress"]) == 0
    assert json.loads((out / "downstream.json").read_text())["generation"]["guidance_scale"] == 6.0
    assert "guidance_scale 6.0, export_step 600" in (out / "downstream.md").read_text()


def test_eval_refuses_an_unreadable_generation_record(split_dir, tmp_path, capsys):
    gen = tmp_path / "gen"
    shutil.copytree(split_dir / "test", gen)
    (gen / "generation.json").write_text("{not json")
    out = tmp_path / "eval"
    assert main(["downstream", "eval", str(split_dir), str(out), "--arms", "generated", "--generated", str(gen),
                 "--seeds", "1", "--steps", "1", "--resolution-px", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "generation.json is not readable JSON" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--arms", "real,magic"], "Unknown arm"),
    (["--arms", "generated"], "need --generated"),
])
def test_eval_bad_arms_get_one_sentence(split_dir, tmp_path, capsys, extra, message):
    assert main(["downstream", "eval", str(split_dir), str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_a_generated_folder_without_pairs(split_dir, tmp_path, capsys):
    empty = tmp_path / "gen"
    empty.mkdir()
    assert main(["downstream", "eval", str(split_dir), str(tmp_path / "o"), "--arms", "generated",
                 "--generated", str(empty), "--resolution-px", "32"]) == 2
    assert "holds no image+mask pair" in capsys.readouterr().err


def test_eval_refuses_a_test_set_without_defect_pixels(data, tmp_path, capsys):
    import shutil

    from defect_ds.data.shards import ShardWriter, build_manifest, write_manifest

    split = tmp_path / "split"
    assert main(["downstream", "split", str(data), str(split)]) == 0
    shutil.rmtree(split / "test")
    (split / "test").mkdir()
    writer = ShardWriter(split / "test")
    for item in iter_dataset(split / "shots"):
        if item["meta"]["defect_type"] == "good":
            writer.write("val", {"__key__": item["key"], "image.png": item["image"], "mask.png": item["mask"],
                                 "caption.txt": item["caption"].encode(), "json": json.dumps(item["meta"]).encode()},
                         "good")
    write_manifest(split / "test", build_manifest(writer.close(), defect_tokens={}))
    assert main(["downstream", "eval", str(split), str(tmp_path / "o"), "--resolution-px", "32"]) == 2
    assert "has no defect pixel in any mask" in capsys.readouterr().err
