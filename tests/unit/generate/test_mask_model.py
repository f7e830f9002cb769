"""The learned mask model: trains from the shots' masks by its own command, loads with checks, and
draws binary masks that generation places on the object."""
from __future__ import annotations

import json

import numpy as np
import pytest

from defect_ds.cli import main
from defect_ds.generate.mask_model import META_FILE, load_mask_model, train_mask_model
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
