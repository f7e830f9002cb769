"""`defect-ds downstream`: the split keeps the sides apart, the arms draw what they say, the scores are
scikit-learn's on the right pixels, and bad input gets one sentence."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from defect_ds.cli import main
from defect_ds.downstream.arms import ArmSampler, Pairs, paste
from defect_ds.downstream.segmenter import colour_jitter_batch, jitter_batch, predict, segmentation_loss, to_tensor
from defect_ds.downstream.scores import score, score_by_type
from defect_ds.downstream.split import choose
from defect_ds.data.reader import iter_dataset


@pytest.fixture(scope="module")
def data(make_synthetic, tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", per_defect=3, good_per_category=4,
                          categories="pill")


@pytest.fixture(scope="module")
def split_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    assert main(["downstream", "split", str(data), str(out)]) == 0
    return out


def test_choose_takes_a_third_in_turn_from_each_category_and_no_key_twice():
    keys = [f"{c}{i}" for c in "abc" for i in range(4)]
    by_type = {"scratch": keys[::-1], "good": [f"g{i}" for i in range(10)]}
    groups = {k: k[0] for k in keys}
    train, test, pool = choose(by_type, shots=None, test_good_fraction=0.5, groups=groups)
    assert pool == {} and len(train["scratch"]) == 4 and len(test["scratch"]) == 8
    assert sorted(k[0] for k in train["scratch"]) == ["a", "a", "b", "c"]  # every category, in turn
    assert sorted(train["scratch"] + test["scratch"]) == sorted(keys)
    assert len(test["good"]) == 5 and not set(train["good"]) & set(test["good"])
    again, _, _ = choose({"scratch": sorted(keys), "good": by_type["good"]}, shots=None, test_good_fraction=0.5,
                      groups=groups)
    assert again == train  # a function of the keys, not of their order
    train, test, _ = choose(by_type, shots=3, test_good_fraction=0.5, groups=groups)
    assert sorted(k[0] for k in train["scratch"]) == ["a", "b", "c"]


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
    image = np.zeros((10, 32, 32, 3), np.uint8)
    mask = np.zeros((10, 32, 32), np.uint8)
    mask[:, 10:20, 12:16] = 1
    image[mask == 1] = 255
    out_image, out_mask = jitter_batch(to_tensor(image), torch.from_numpy(mask).float()[:, None], rng)
    assert set(np.unique(out_mask.numpy())) <= {0, 1}
    for i in range(10):
        m = out_mask[i, 0] == 1
        assert m.any() and out_image[i, :, m].mean() > 200 / 127.5 - 1  # the defect pixels moved with their mask
    assert not torch.equal(out_mask[0], out_mask[1])  # each sample drew its own jitter


def test_colour_jitter_changes_each_images_colours_and_keeps_grey_grey():
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    images[:, :, 0] = 0.25  # a grey row
    assert torch.allclose(colour_jitter_batch(images, np.random.default_rng(0), 0.0), images, atol=1e-6)
    out = colour_jitter_batch(images, np.random.default_rng(0), 0.3)
    assert torch.equal(out, colour_jitter_batch(images, np.random.default_rng(0), 0.3))  # a function of the stream
    assert out.min() >= -1 and out.max() <= 1
    grey = out[:, :, 0]  # hue and saturation leave grey grey; brightness and contrast move it
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    change = (out - images).abs().mean(dim=(1, 2, 3))
    assert (change > 0.01).all() and change.unique().numel() == 6  # each image drew its own


class _LeftLeaning(torch.nn.Module):
    """Logits = the image's red channel plus a ramp that rises to the right: not flip-equivariant."""

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[-1]).expand_as(x[:, :1])
        return x[:, :1] * 4 + ramp * 2


def test_flip_averaged_prediction_maps_each_flip_back_onto_the_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    net = _LeftLeaning()
    plain, averaged = predict(net, images), predict(net, images, flips=True)
    x = to_tensor(images)[:, :1] * 4
    ramp = torch.linspace(-1, 1, 8) * 2
    # the ramp's left-right flips cancel in the mean, the image's own pattern stays where it is
    expected = (torch.sigmoid(x + ramp) + torch.sigmoid(x - ramp)) / 2
    assert np.allclose(averaged, expected[:, 0].numpy(), atol=1e-6)
    assert not np.allclose(plain, averaged, atol=1e-3)


def test_per_image_dice_weighs_a_missed_thin_defect_as_much_as_a_found_large_one():
    masks = torch.zeros(3, 1, 16, 16)
    masks[0, 0, 8, 2:14] = 1  # a one-pixel line
    masks[1, 0, 2:14, 2:14] = 1  # a large spot; image 2 is good
    logits = torch.full_like(masks, -20.0)
    logits[1] = torch.where(masks[1].bool(), 20.0, -20.0)  # finds the spot, misses the line
    batch, per_image = (segmentation_loss(logits, masks, kind).item() for kind in ("bce-dice", "bce-dice-image"))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks).item()
    assert batch - bce == pytest.approx(1 - (2 * 144 + 1) / (144 + 156 + 1), abs=1e-4)  # the line's 12 pixels of 156
    assert per_image - bce == pytest.approx(((1 - 1 / 13) + 0) / 2, abs=1e-4)  # the line's Dice is half the loss
    perfect = torch.where(masks.bool(), 20.0, -20.0)
    assert segmentation_loss(perfect, masks, "bce-dice-image").item() < 1e-3
    only_good = torch.zeros(2, 1, 16, 16)
    assert segmentation_loss(perfect[2:], only_good[:1], "bce-dice-image").item() < 1e-3  # BCE alone
    with pytest.raises(ValueError, match="Unknown segmentation loss"):
        segmentation_loss(perfect, masks, "dice")


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
    assert results["settings"]["flips"] is True  # scored as the mean over each test image's flips by default
    summary = results["arms"]["real"]["summary"]
    assert set(summary["all"]) == {"pixel_ap", "pixel_auroc", "pixel_f1_max", "iou", "image_auroc"}
    assert {"crack", "scratch", "spot"} <= set(summary) and len(results["arms"]["real"]["per_seed"]) == 2
    md = (out / "downstream.md").read_text()
    assert "won" not in md and "Paired pixel_ap differences" in md
    comparisons = results["comparisons"]
    assert {(c["arm"], c["baseline"]) for c in comparisons} == {
        ("copy-paste", "real"), ("generated", "real"), ("real", "copy-paste"), ("generated", "copy-paste")}
    assert {c["type"] for c in comparisons} == {"all", "crack", "scratch", "spot"}
    for c in comparisons:
        assert c["ci_low"] <= c["difference"] <= c["ci_high"] or c["verdict"] != "no detectable difference"
        assert c["verdict"] in ("better", "worse", "no detectable difference")
    assert results["environment"]["device"] and results["environment"]["torch"]
    assert results["generation"] is None  # the test set is not a `defect-ds generate` folder
    assert (out / "downstream.png").stat().st_size > 0 and (out / "predictions.png").stat().st_size > 0


def test_eval_on_a_full_disk_keeps_the_old_results_and_says_so_in_one_sentence(split_dir, tmp_path, capsys,
                                                                               full_disk):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "downstream.json").write_text('{"old": true}\n')
    full_disk.fill()  # the first write is the first scored segmenter's, kept for a resume
    assert main(["downstream", "eval", str(split_dir), str(out), "--seeds", "2", "--steps", "1", "--batch-size", "4",
                 "--resolution-px", "32", "--workers", "1", "--resamples", "100", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"defect-ds downstream: error: No space left while writing {re.escape(str(out))}/segmenters/"
                        r"\w+/real-seed0\.pkl; nothing there was changed; free space and rerun; the segmenters kept "
                        r"so far are reused\.", err), err
    assert json.loads((out / "downstream.json").read_text()) == {"old": True}
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["downstream.json"]
    full_disk.fill(after_writes=4)  # four segmenters kept, then the results (over 4096 bytes) meet a full disk
    assert main(["downstream", "eval", str(split_dir), str(out), "--seeds", "2", "--steps", "1", "--batch-size", "4",
                 "--resolution-px", "32", "--workers", "1", "--resamples", "100", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"writing {out / 'downstream.json'}; nothing there was changed; "
                                                    "free space and rerun.")
    assert json.loads((out / "downstream.json").read_text()) == {"old": True}  # not cut at 4096 bytes


def test_eval_records_how_the_generated_pairs_were_drawn(split_dir, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(split_dir / "test", gen)
    (gen / "generation.json").write_text(json.dumps({"mode": "inpaint", "guidance_scale": 6.0, "export_step": 600}))
    out = tmp_path / "eval"
    assert main(["downstream", "eval", str(split_dir), str(out), "--arms", "generated", "--generated", str(gen),
                 "--seeds", "2", "--steps", "1", "--batch-size", "4", "--resolution-px", "32", "--no-progress"]) == 0
    assert json.loads((out / "downstream.json").read_text())["generation"]["guidance_scale"] == 6.0
    assert "guidance_scale 6.0, export_step 600" in (out / "downstream.md").read_text()


def test_eval_refuses_an_unreadable_generation_record(split_dir, tmp_path, capsys):
    gen = tmp_path / "gen"
    shutil.copytree(split_dir / "test", gen)
    (gen / "generation.json").write_text("{not json")
    out = tmp_path / "eval"
    assert main(["downstream", "eval", str(split_dir), str(out), "--arms", "generated", "--generated", str(gen),
                 "--seeds", "2", "--steps", "1", "--resolution-px", "32", "--no-progress"]) == 2
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
    record = json.loads((split / "split.json").read_text())  # the split now says the test side is those goods
    record["test"] = {"good": [i["key"] for i in iter_dataset(split / "test")]}
    (split / "split.json").write_text(json.dumps(record))
    assert main(["downstream", "eval", str(split), str(tmp_path / "o"), "--resolution-px", "32"]) == 2
    assert "has no defect pixel in any mask" in capsys.readouterr().err


def _rewrite_shards(folder, edit):
    """Rewrites a shard folder's samples through edit(item) -> item or None (dropped), keeping its manifest."""
    from defect_ds.data.shards import ShardWriter

    items = list(iter_dataset(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    for tar in folder.glob("*.tar"):
        tar.unlink()
    writer = ShardWriter(folder)
    for item in items:
        item = edit(item)
        if item is not None:
            writer.write("val", {"__key__": item["key"], "image.png": item["image"], "mask.png": item["mask"],
                                 "caption.txt": item["caption"].encode(), "json": json.dumps(item["meta"]).encode()},
                         item["meta"]["defect_type"])
    written = writer.close()
    manifest["shards"] = written
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("extra, message", [
    (["--arms", "real,real,copy-paste"], "more than once"),
    (["--seeds", "1"], "at least 2 seeds"),
    (["--steps", "0"], "--steps 0 is too small"),
    (["--resolution-px", "0"], "--resolution-px 0 is too small"),
])
def test_eval_bad_numbers_and_repeated_arms_get_one_sentence(split_dir, tmp_path, capsys, extra, message):
    assert main(["downstream", "eval", str(split_dir), str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "o").exists()


def test_eval_refuses_a_test_set_shorter_than_the_split(split_dir, tmp_path, capsys):
    split = tmp_path / "split"
    shutil.copytree(split_dir, split)
    dropped = []
    _rewrite_shards(split / "test", lambda item: dropped.append(item["key"]) if not dropped else item)
    assert main(["downstream", "eval", str(split), str(tmp_path / "o"), "--resolution-px", "32"]) == 2
    assert "1 missing" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_eval_refuses_a_mask_of_another_size_by_key(split_dir, tmp_path, capsys):
    import io

    from PIL import Image

    split = tmp_path / "split"
    shutil.copytree(split_dir, split)
    small = io.BytesIO()
    Image.new("L", (8, 8)).save(small, format="PNG")
    victim = []

    def shrink(item):
        if not victim:
            victim.append(item["key"])
            item["mask"] = small.getvalue()
        return item

    _rewrite_shards(split / "test", shrink)
    assert main(["downstream", "eval", str(split), str(tmp_path / "o"), "--resolution-px", "32"]) == 2
    err = capsys.readouterr().err
    assert victim[0] in err and "8x8" in err


def test_eval_refuses_images_over_the_pixel_limit(split_dir, tmp_path, capsys, monkeypatch):
    import defect_ds.downstream.cli as cli

    monkeypatch.setattr(cli, "DEFAULT_MAX_IMAGE_PIXELS", 32 * 32 - 1)
    assert main(["downstream", "eval", str(split_dir), str(tmp_path / "o"), "--resolution-px", "32"]) == 2
    assert "over the limit" in capsys.readouterr().err


def test_eval_refuses_pairs_generated_into_test_images(split_dir, tmp_path, capsys):
    gen = tmp_path / "gen"
    shutil.copytree(split_dir / "test", gen)
    # every pair claims to be inpainted into the test image of the same key
    _rewrite_shards(gen, lambda item: {**item, "meta": {**item["meta"], "generation": {
        "source_image": f"{split_dir}/test:{item['key']}"}}})
    assert main(["downstream", "eval", str(split_dir), str(tmp_path / "o"), "--arms", "generated", "--generated",
                 str(gen), "--resolution-px", "32"]) == 2
    assert "drawn into test images" in capsys.readouterr().err


def test_segmenter_results_do_not_depend_on_the_number_of_workers(split_dir):
    from defect_ds.downstream.cli import load_pairs, load_test
    from defect_ds.downstream.runner import ArmData, SegmenterSettings, run_jobs

    data = ArmData(load_pairs(split_dir / "shots", 32, defects=True),
                   load_pairs(split_dir / "shots", 32, defects=False).images, {}, load_test(split_dir / "test", 32))
    results = []
    for workers in (1, 2):
        got = {}
        run_jobs([("real", 0), ("copy-paste", 1)], data, SegmenterSettings(3, 4, 4), workers=workers, grid_rows=[0],
                 on_done=lambda o: got.__setitem__((o.arm, o.seed), o.scores["all"]["pixel_ap"]))
        results.append(got)
    assert results[0] == results[1] and len(results[0]) == 2


def test_members_average_the_probabilities_of_their_seeds_nets(split_dir, monkeypatch):
    from defect_ds.downstream import runner
    from defect_ds.downstream.cli import load_pairs, load_test
    from defect_ds.downstream.segmenter import predict as real_predict

    data = runner.ArmData(load_pairs(split_dir / "shots", 32, defects=True),
                          load_pairs(split_dir / "shots", 32, defects=False).images, {},
                          load_test(split_dir / "test", 32))
    probs = {}  # members -> the probabilities scored; trained nets -> their own probabilities
    nets = []
    monkeypatch.setattr("defect_ds.downstream.segmenter.predict", lambda net, images, flips=False: (
        nets.append((net, real_predict(net, images))) or nets[-1][1]))
    for members in (1, 2):
        nets.clear()
        runner.run_jobs([("real", 3)], data, runner.SegmenterSettings(3, 4, 4, members=members), workers=1,
                        grid_rows=[0], on_done=lambda o: probs.__setitem__(members, o.scores["all"]["pixel_ap"]))
        assert len(nets) == members
    own = [p for _, p in nets]
    assert not np.allclose(own[0], own[1])  # member 1 trains from its own seed
    single = runner.score_by_type(own[0], data.test.masks, data.test.types)["all"]["pixel_ap"]
    mean = runner.score_by_type((own[0] + own[1]) / 2, data.test.masks, data.test.types)["all"]["pixel_ap"]
    assert probs == {1: single, 2: mean}  # member 0 is the seed's own net; two members score their mean
    one, two = (runner.fingerprint(data, runner.SegmenterSettings(3, 4, 4, members=k), [0], "real") for k in (1, 2))
    assert one != two and one == runner.fingerprint(data, runner.SegmenterSettings(3, 4, 4), [0], "real")


def test_colour_jitter_reaches_training_and_its_fingerprint_only_when_on(split_dir, monkeypatch):
    from defect_ds.downstream import runner, segmenter
    from defect_ds.downstream.cli import load_pairs, load_test

    data = runner.ArmData(load_pairs(split_dir / "shots", 32, defects=True),
                          load_pairs(split_dir / "shots", 32, defects=False).images, {},
                          load_test(split_dir / "test", 32))
    strengths = []
    real = segmenter.colour_jitter_batch
    monkeypatch.setattr(segmenter, "colour_jitter_batch",
                        lambda x, rng, strength: strengths.append(strength) or real(x, rng, strength))
    runner._init(data, runner.SegmenterSettings(2, 4, 4, colour=0.2), [0], 1)
    runner._run("real", 0)
    assert strengths == [0.2, 0.2]  # every step of the one net
    plain, jittered = (runner.fingerprint(data, runner.SegmenterSettings(3, 4, 4, colour=c), [0], "real")
                       for c in (0.0, 0.2))
    assert plain != jittered and plain == runner.fingerprint(data, runner.SegmenterSettings(3, 4, 4), [0], "real")


def test_an_interrupted_evaluation_reuses_what_it_scored_and_a_changed_one_does_not(split_dir, tmp_path, monkeypatch):
    from defect_ds.downstream import runner
    from defect_ds.downstream.cli import load_pairs, load_test

    data = runner.ArmData(load_pairs(split_dir / "shots", 32, defects=True),
                          load_pairs(split_dir / "shots", 32, defects=False).images, {},
                          load_test(split_dir / "test", 32))
    settings, jobs = runner.SegmenterSettings(3, 4, 4), [("real", 0), ("copy-paste", 0), ("real", 1)]
    straight = {}
    runner.run_jobs(jobs, data, settings, workers=1, grid_rows=[0],
                    on_done=lambda o: straight.__setitem__((o.arm, o.seed), o.scores))
    real_run = runner._run
    trained = []

    def crash_on_third(arm, seed):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append((arm, seed))
        return real_run(arm, seed)

    monkeypatch.setattr(runner, "_run", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        runner.run_jobs(jobs, data, settings, workers=1, grid_rows=[0], on_done=lambda o: None, cache_dir=tmp_path)
    trained.clear()
    monkeypatch.setattr(runner, "_run", lambda arm, seed: (trained.append((arm, seed)), real_run(arm, seed))[1])
    resumed = {}
    reused = runner.run_jobs(jobs, data, settings, workers=1, grid_rows=[0], cache_dir=tmp_path,
                             on_done=lambda o: resumed.__setitem__((o.arm, o.seed), o.scores))
    assert reused == 2 and trained == [("real", 1)] and resumed == straight
    trained.clear()
    runner.run_jobs(jobs, data, runner.SegmenterSettings(4, 4, 4), workers=1, grid_rows=[0], cache_dir=tmp_path,
                    on_done=lambda o: None)
    assert trained == jobs  # other settings: nothing reused
    trained.clear()
    data.generated = {"generated": data.shots}  # another arm's pairs do not change what `real` is scored on
    reused = runner.run_jobs([("real", 0), ("generated", 0), ("real", 2)], data, settings, workers=1, grid_rows=[0],
                             cache_dir=tmp_path, on_done=lambda o: None)
    assert reused == 1 and trained == [("generated", 0), ("real", 2)]


def test_segmenter_benchmark_scores_flips_and_the_same_nets_without_them(split_dir, tmp_path, load_script,
                                                                         monkeypatch):
    bench = load_script("benchmarks/segmenter.py")
    monkeypatch.setattr("sys.argv", ["segmenter.py", str(split_dir), str(split_dir), "--configs", "8x3:flips=1",
                                     "--seeds", "2", "--workers", "1", "--out", str(tmp_path),
                                     "--cache", str(tmp_path / "cache"), "--tag", "t"])
    assert bench.main() == 0
    record = json.loads(next(tmp_path.glob("segmenter-*-t.json")).read_text())["configs"]["8x3:flips=1"]
    assert record["settings"]["flips"] is True
    assert bench.main() == 0  # from the kept segmenters: the same figures, their training time kept
    assert json.loads(next(tmp_path.glob("segmenter-*-t.json")).read_text())["configs"]["8x3:flips=1"] == record
    assert record["seconds_per_segmenter"] > 0
    for arm in ("real", "copy-paste"):
        flipped, plain = record["arms"][arm]["pixel_ap"], record["unflipped"][arm]["pixel_ap"]
        assert len(flipped) == len(plain) == 2 and flipped != plain  # one training, scored both ways
        d = record["flips_minus_unflipped"][arm]
        assert d["baseline"] == "unflipped" and d["ci_low"] <= d["difference"] <= d["ci_high"]
    assert "the same nets without flips" in next(tmp_path.glob("segmenter-*-t.md")).read_text()


def test_segmenter_benchmark_reads_its_config_options_and_refuses_bad_ones(load_script):
    bench = load_script("benchmarks/segmenter.py")
    settings = bench.parse_config("16x40:flips=1:members=2:colour=0.2:loss=focal", 8)
    assert (settings.width, settings.steps, settings.batch_size) == (16, 40, 8)
    assert settings.flips and settings.members == 2 and settings.colour == 0.2 and settings.loss == "focal"
    with pytest.raises(SystemExit, match="unknown options"):
        bench.parse_config("8x40:colours=0.2", 16)
    with pytest.raises(SystemExit, match="at least 1"):
        bench.parse_config("8x40:members=0", 16)


def test_segmenter_benchmark_compares_the_arms_with_generated_pairs_with_both_baselines(split_dir, tmp_path,
                                                                                      load_script, monkeypatch):
    bench = load_script("benchmarks/segmenter.py")
    argv = ["segmenter.py", str(split_dir), str(split_dir), "--configs", "8x2", "--seeds", "2", "--workers", "1",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--tag", "g",
            "--arms", "real,copy-paste,copy-paste+generated"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit, match="need --generated"):
        bench.main()
    monkeypatch.setattr("sys.argv", argv + ["--generated", str(split_dir / "test")])
    assert bench.main() == 0
    record = json.loads(next(tmp_path.glob("segmenter-*-g.json")).read_text())["configs"]["8x2"]
    pairs = {(c["arm"], c["baseline"]) for c in record["comparisons"]}
    assert pairs == {("real", "copy-paste"), ("copy-paste", "real"), ("copy-paste+generated", "real"),
                     ("copy-paste+generated", "copy-paste")}
    assert record["copy_paste_minus_real"]["arm"] == "copy-paste"
    assert len(record["arms"]["copy-paste+generated"]["pixel_ap"]) == 2
    assert "copy-paste+generated vs copy-paste" in next(tmp_path.glob("segmenter-*-g.md")).read_text()


def test_diversity_is_zero_for_the_shots_redrawn_and_positive_for_unseen_defects(split_dir, tmp_path, load_script,
                                                                              monkeypatch, capsys):
    bench = load_script("benchmarks/diversity.py")
    shots = str(split_dir / "shots")
    monkeypatch.setattr("sys.argv", ["diversity.py", shots, shots, "--reference", str(split_dir / "test"),
                                     "--out", str(tmp_path), "--tag", "t"])
    assert bench.main() == 0
    per_type = json.loads((tmp_path / f"diversity-{__import__('datetime').date.today()}-t.json").read_text())["per_type"]
    assert per_type
    for row in per_type.values():
        for name in ("patch", "look"):
            assert row[name]["generated"] == 0 and row[name]["generated_over_reference"] == 0  # copies of shots
            loo = row[name]["shots_leave_one_out"]  # None with a single shot of the type
            assert row[name]["reference"] > 0 and (loo is None or loo > 0)
    assert "generated / reference" in capsys.readouterr().out


def test_ablation_levers_parse_combine_and_bad_ones_are_one_sentence(load_script, monkeypatch, tmp_path, split_dir):
    bench = load_script("benchmarks/ablation.py")
    drawn = bench.drawn_at(split_dir)
    assert drawn is not None and bench.drawn_at(tmp_path) is None
    monkeypatch.setattr(bench, "ATTENTION_32_BASE", str(tmp_path / "no-base"))
    assert bench.variant("guidance-2+pairs-96") == ([], ["--guidance-scale", "2", "--num-per-type", "96"], False, "full")
    assert bench.variant("keep-recognisable")[3] == "full"  # generation only: the full method's fine-tune
    assert bench.variant("no-finetune")[0] is None
    assert "--train.max_steps=1800" in bench.variant("attention-32-long")[0]
    for bad in ("guidance-x", "pairs", "colour-2"):
        with pytest.raises(SystemExit, match="Unknown variant"):
            bench.variant(bad)
    for argv, message in ((["--variants", "no-gating"], "must include full"),
                          (["--baselines", "generated"], "real and copy-paste only"),
                          (["--validation", str(tmp_path / "none")], "no test side"),
                          (["--variants", "full,attention-32"], "attention-32 needs its base"),
                          (["--variants", "full,attention-32-long"], "attention-32-long needs its base"),
                          (["--validation", str(split_dir), "--resolution-px", str(drawn + 32)],
                           f"drawn at {drawn} px and the ablation runs at {drawn + 32} px")):
        monkeypatch.setattr("sys.argv", ["ablation.py", "--work", str(tmp_path / "w"), *argv])
        with pytest.raises(SystemExit, match=message):
            bench.main()
    assert not (tmp_path / "w").exists()  # refused before anything is written
