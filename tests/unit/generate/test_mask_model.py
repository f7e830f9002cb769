"""The learned mask model: trains from the shots' masks by its own command, loads with checks, and
draws binary masks that generation places on the object."""
from __future__ import annotations

import json

import numpy as np
import pytest

from defect_ds.cli import main
from defect_ds.generate.mask_model import META_FILE, WEIGHTS_FILE, load_mask_model, train_mask_model
from defect_ds.data.objects import object_region
from defect_ds.generate.spec import GenerationSettings, plan_samples


@pytest.fixture(scope="module")
def shots(make_synthetic, tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("shots") / "data", categories="pill")


def test_train_masks_writes_a_loadable_model_that_draws_binary_masks(shots, tmp_path, capsys):
    out = tmp_path / "mm"
    assert main(["train-masks", str(shots), str(out), "--resolution-px", "32", "--steps", "3", "--batch-size", "2",
                 "--quiet"]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["resolution_px"] == 32 and meta["defect_types"] == sorted(meta["defect_types"])
    types = meta["defect_types"]
    model = load_mask_model(out, 32, types)
    a = model.sample(types[0], np.random.default_rng(1))
    assert a.shape == (32, 32) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1} and a.any()
    assert np.array_equal(a, model.sample(types[0], np.random.default_rng(1)))  # seeded
    # a model made for another resolution, or without the type, is refused in one sentence
    with pytest.raises(ValueError, match=r"draws 32 px masks but generation is at 64 px.*--resolution-px 64"):
        load_mask_model(out, 64, types)
    with pytest.raises(ValueError, match="'dent'"):
        load_mask_model(out, 32, ["dent"])
    # generation places what it draws on the object, exactly 0/1, and records where
    source = np.full((32, 32, 3), 20, np.uint8)
    source[6:26, 6:26] = 200
    specs = plan_samples({types[0]: "sks"}, [types[0]], 2, GenerationSettings(mode="inpaint", resolution_px=32,
                         mask_source="learned"), mask_pool={}, sources=[(source, "s", "pill")],
                         mask_sampler=model.sample)
    region = object_region(source)
    for spec in specs:
        assert spec.mask.any() and not (spec.mask.astype(bool) & ~region).any()
        assert spec.mask_origin.startswith("learned:") and "offset_yx" in spec.extra["mask_placement"]


def test_train_masks_names_a_type_without_masks(shots, tmp_path):
    with pytest.raises(ValueError, match=r"Defect type 'dent' has no non-empty mask among the shots"):
        train_mask_model(str(shots), tmp_path / "mm", resolution_px=32, steps=1, defect_types=["dent"],
                         log_every=0, bank_per_type=2)


def test_train_masks_runs_any_number_of_steps(shots, tmp_path):
    # 20 steps once made the warm-up exactly one step long and torch's schedule divided by zero
    for steps in (1, 2, 20):
        assert main(["train-masks", str(shots), str(tmp_path / f"mm{steps}"), "--resolution-px", "32", "--steps",
                     str(steps), "--batch-size", "2", "--quiet"]) == 0


def test_train_masks_on_data_without_defects_is_one_sentence(shots, tmp_path, capsys):
    from defect_ds.data.reader import iter_dataset
    from defect_ds.data.shards import ShardWriter, build_manifest, write_manifest

    good = tmp_path / "good"
    good.mkdir()
    writer = ShardWriter(good)
    for s in iter_dataset(shots):
        if s["meta"]["defect_type"] == "good":
            writer.write("train", {"__key__": s["key"], "image.png": s["image"], "mask.png": s["mask"],
                                   "caption.txt": s["caption"].encode(), "json": json.dumps(s["meta"]).encode()},
                         "good")
    write_manifest(good, build_manifest(writer.close(), defect_tokens={}))
    assert main(["train-masks", str(good), str(tmp_path / "mm"), "--resolution-px", "32", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defect-ds train-masks: error: ") and "holds no defect samples" in err and "\n" not in err
    assert not (tmp_path / "mm").exists()


def test_a_damaged_mask_model_is_one_sentence_naming_the_file(shots, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "mm"
    assert main(["train-masks", str(shots), str(out), "--resolution-px", "32", "--steps", "1", "--quiet"]) == 0
    types = json.loads((out / META_FILE).read_text())["defect_types"]
    weights = out / WEIGHTS_FILE
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=rf"The mask model {weights} is not readable .*train it again"):
        load_mask_model(out, 32, types)
    weights.write_bytes(whole)
    state = load_file(str(weights))
    state["conv_in.weight"] = state["conv_in.weight"][:8]  # another UNet's weights
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"does not fit the UNet .*conv_in.weight: expected \(16, 1, 3, 3\), "
                                         r"found \(8, 1, 3, 3\)"):
        load_mask_model(out, 32, types)
    (out / META_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"lacks the fields resolution_px"):
        load_mask_model(out, 32, types)
