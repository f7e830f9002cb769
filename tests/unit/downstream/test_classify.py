"""Image-level labels (ELPV): the split keeps a pool for all-real apart from the test set, CutMix pastes a
box, the classify task scores image AUROC, AP, F1-max and accuracy with paired comparisons, and bad input
gets one sentence. Runs on a fake ELPV folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from defect_ds.cli import main
from defect_ds.data.reader import iter_dataset
from defect_ds.downstream.arms import ArmSampler, Pairs, cutmix
from defect_ds.downstream.compare import image_evidence, score
from defect_ds.downstream.runner import ArmData, SegmenterSettings, fingerprint
from defect_ds.downstream.scores import classify_score
from defect_ds.downstream.split import choose


@pytest.fixture(scope="module")
def elpv_data(make_elpv, tmp_path_factory):
    out = tmp_path_factory.mktemp("elpv") / "data"
    assert main(["prepare", "elpv", str(make_elpv(tmp_path_factory.mktemp("raw"))), str(out), "--resolution-px", "32",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def elpv_split(elpv_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("elpv-split")
    assert main(["downstream", "split", str(elpv_data), str(out), "--shots", "2", "--pool-fraction", "0.5"]) == 0
    return out


def test_choose_keeps_the_pool_apart_from_shots_and_test():
    keys = [f"{c}{i}" for c in "ab" for i in range(7)]
    by_type, groups = {"defect": keys, "good": [f"g{i}" for i in range(6)]}, {k: k[0] for k in keys}
    shots, test, pool = choose(by_type, shots=2, test_good_fraction=0.5, groups=groups, pool_fraction=0.5)
    assert len(shots["defect"]) == 2 and len(pool["defect"]) == 6 and len(test["defect"]) == 6
    assert sorted(k[0] for k in shots["defect"]) == ["a", "b"] and sorted(k[0] for k in pool["defect"]) == list("aaabbb")
    assert sorted(shots["defect"] + pool["defect"] + test["defect"]) == sorted(keys)
    no_pool = choose(by_type, shots=2, test_good_fraction=0.5, groups=groups)
    assert no_pool[0] == shots and no_pool[2] == {} and set(no_pool[1]["defect"]) == set(test["defect"] + pool["defect"])
    _, test, pool = choose(by_type, shots=2, test_good_fraction=0.5, groups=groups, pool_fraction=0.99)
    assert len(test["defect"]) == 1 and len(pool["defect"]) == 11  # one test image stays


def test_split_of_elpv_cells_writes_shots_pool_and_test_with_no_key_twice(elpv_split):
    record = json.loads((elpv_split / "split.json").read_text())
    sides = {name: {item["key"]: item["meta"] for item in iter_dataset(elpv_split / name)}
             for name in ("shots", "pool", "test")}
    assert not sides["shots"].keys() & sides["pool"].keys() and not sides["pool"].keys() & sides["test"].keys()
    assert not sides["shots"].keys() & sides["test"].keys()
    assert record["shots_per_type"] == {"defect": 2} and len(record["pool"]["defect"]) == 6
    assert len(record["test"]["defect"]) == 6 and len(record["test"]["good"]) == 8
    assert set(sides["pool"]) == set(record["pool"]["defect"])
    assert sorted(m["cell_type"] for m in sides["shots"].values() if m["defect_type"] == "defect") == ["mono", "poly"]
    assert {m["defect_type"] for m in sides["pool"].values()} == {"defect"}


def test_cutmix_pastes_a_box_of_the_shot_at_the_same_place():
    rng = np.random.default_rng(0)
    shot, good = np.full((32, 32, 3), 200, np.uint8), np.full((32, 32, 3), 50, np.uint8)
    full = np.ones((32, 32), np.uint8)
    for _ in range(20):
        image, mask = cutmix(shot, full, good, rng)
        ys, xs = np.nonzero(mask)
        box = np.zeros_like(mask)
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
        assert (mask == box).all() and 0.2 < mask.mean() < 0.8  # one box, a quarter to three quarters
        assert (image[mask == 1] == 200).all() and (image[mask == 0] == 50).all()
    shot_mask = np.zeros((32, 32), np.uint8)
    shot_mask[:2, :2] = 1  # a masked defect outside the box stays out of the label
    masks = [cutmix(shot, shot_mask, good, rng)[1] for _ in range(20)]
    assert all(m.sum() <= 4 for m in masks) and any(m.sum() == 0 for m in masks)


def test_all_real_draws_from_the_pool_as_well_and_needs_one():
    def pairs(value, n):
        return Pairs(np.full((n, 8, 8, 3), value, np.uint8), np.ones((n, 8, 8), np.uint8), ["defect"] * n,
                     [f"{value}-{i}" for i in range(n)])

    shots, pool, goods = pairs(10, 2), pairs(240, 6), np.full((3, 8, 8, 3), 100, np.uint8)
    drawn = ArmSampler("all-real", shots, goods, None, pool).defect_batch(np.random.default_rng(0), 64)[0][:, 0, 0, 0]
    assert set(drawn) == {10, 240}
    assert set(ArmSampler("real", shots, goods, None, pool).defect_batch(np.random.default_rng(0), 16)[0].ravel()) == {10}
    with pytest.raises(ValueError, match="all-real needs the split's pool"):
        ArmSampler("all-real", shots, goods, None, None)
    test = pairs(50, 2)
    data = ArmData(shots, goods, {}, test, pool)
    other = ArmData(shots, goods, {}, test, pairs(241, 6))
    segment, classify = SegmenterSettings(3, 4, 4), SegmenterSettings(3, 4, 4, task="classify")
    assert fingerprint(data, segment, [], "real") == fingerprint(other, segment, [], "real")
    assert fingerprint(data, segment, [], "all-real") != fingerprint(other, segment, [], "all-real")
    assert fingerprint(data, segment, [], "real") != fingerprint(data, classify, [], "real")


def test_classify_scores_and_their_binned_resamples_agree_with_scikit_learn():
    is_defect = np.array([True, True, True, False, False, False, False, False])
    probs = np.array([0.9, 0.7, 0.3, 0.8, 0.2, 0.1, 0.05, 0.4])
    scores = classify_score(probs, is_defect)
    assert scores["image_auroc"] == pytest.approx(12 / 15)
    assert scores["image_ap"] == pytest.approx(average_precision_score(is_defect, probs))
    # best F1 at 0.3 (all 3 found, 2 false alarms): F1 3/4, accuracy 6/8
    assert scores["image_f1_max"] == pytest.approx(3 / 4) and scores["accuracy"] == pytest.approx(6 / 8)
    ev, ones = image_evidence(probs, is_defect), np.ones((1, len(probs)), np.float32)
    assert score(ev, "image_ap", ones, is_defect)[0] == pytest.approx(scores["image_ap"])
    assert score(ev, "accuracy", ones, is_defect)[0] == pytest.approx(scores["accuracy"])
    assert score(ev, "image_auroc", ones, is_defect)[0] == pytest.approx(scores["image_auroc"])
    perfect = classify_score(is_defect.astype(float), is_defect)
    assert perfect == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0, "accuracy": 1.0}


def test_classify_eval_scores_every_arm_and_compares_them_in_pairs(elpv_split, tmp_path):
    out = tmp_path / "eval"
    arms = "real,cutmix,generated,real+generated,cutmix+generated,all-real"
    assert main(["downstream", "eval", str(elpv_split), str(out), "--task", "classify", "--arms", arms,
                 "--generated", str(elpv_split / "shots"), "--seeds", "2", "--steps", "2", "--batch-size", "4",
                 "--resolution-px", "32", "--resamples", "100", "--workers", "1", "--no-progress"]) == 0
    results = json.loads((out / "downstream.json").read_text())
    assert sorted(results["arms"]) == sorted(arms.split(",")) and results["settings"]["task"] == "classify"
    assert set(results["arms"]["all-real"]["summary"]["all"]) == {"image_auroc", "image_ap", "image_f1_max", "accuracy"}
    assert results["train"]["pool"] == 6 and results["test"] == {"defect_images": 6, "good_images": 8}
    comparisons = results["comparisons"]
    assert {c["baseline"] for c in comparisons} == {"real", "cutmix"}
    assert {c["metric"] for c in comparisons} == {"image_ap", "image_auroc", "accuracy"}
    assert ("all-real", "real") in {(c["arm"], c["baseline"]) for c in comparisons}
    md = (out / "downstream.md").read_text()
    assert md.startswith("# Does it help? Classifiers") and "Paired image_auroc differences" in md
    assert (out / "downstream.png").is_file() and not (out / "predictions.png").exists()


@pytest.mark.parametrize("split_flags, eval_flags, message", [
    (["--test-good-fraction", "0.01"], [], "has no good images; --task classify scores need both classes"),
    ([], ["--arms", "real,all-real"], "The arm all-real needs defect images kept on the training side"),
    ([], ["--arms", "real,copy-paste"], "Unknown arm(s) copy-paste in --arms for --task classify"),
])
def test_classify_bad_input_gets_one_sentence_and_nothing_is_written(elpv_data, tmp_path, capsys, split_flags,
                                                                     eval_flags, message):
    split = tmp_path / "split"
    assert main(["downstream", "split", str(elpv_data), str(split), "--shots", "2", *split_flags]) == 0
    capsys.readouterr()
    assert main(["downstream", "eval", str(split), str(tmp_path / "o"), "--task", "classify", "--resolution-px", "32",
                 *eval_flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_split_refuses_too_many_shots_and_a_set_of_one_class(elpv_data, tmp_path, capsys):
    from defect_ds.data.shards import ShardWriter, build_manifest, read_manifest, write_manifest

    assert main(["downstream", "split", str(elpv_data), str(tmp_path / "a"), "--shots", "14"]) == 2
    assert "--shots 14 leaves no test image of 'defect' (14 images); use 1 to 13." in capsys.readouterr().err
    goods = tmp_path / "goods"
    goods.mkdir()
    writer = ShardWriter(goods)
    for item in iter_dataset(elpv_data):
        if item["meta"]["defect_type"] == "good":
            writer.write("train", {"__key__": item["key"], "image.png": item["image"], "mask.png": item["mask"],
                                   "caption.txt": item["caption"].encode(), "json": json.dumps(item["meta"]).encode()},
                         "good")
    write_manifest(goods, build_manifest(writer.close(), defect_tokens=read_manifest(elpv_data)["defect_tokens"]))
    assert main(["downstream", "split", str(goods), str(tmp_path / "b")]) == 2
    assert "has good images only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
