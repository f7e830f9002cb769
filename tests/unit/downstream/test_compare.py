"""Paired bootstrap comparisons: binned AP is scikit-learn's AP, clear differences get a verdict, equal arms don't."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from defect_ds.downstream.compare import (BINS, LOGIT_RANGE, average_precision, compare, evidence, verdict,
                                          weighted_auroc)


def _test_set(rng, n_defect=12, n_good=8, size=16):
    masks = np.zeros((n_defect + n_good, size, size), np.uint8)
    for i in range(n_defect):
        y, x = rng.integers(2, size - 6, 2)
        masks[i, y:y + 4, x:x + 3] = 1
    types = ["scratch"] * (n_defect // 2) + ["spot"] * (n_defect - n_defect // 2) + ["good"] * n_good
    return masks, types


def _binned(probs):
    """The probabilities moved to the centre of their bin (what the binned AP sees)."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    logit = np.log(p) - np.log1p(-p)
    edge = np.clip((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS, 0, BINS - 1).astype(int)
    return edge


def test_binned_average_precision_is_sklearns_on_the_binned_scores():
    rng = np.random.default_rng(0)
    masks, _ = _test_set(rng)
    probs = np.clip(masks * 0.6 + rng.random(masks.shape) * 0.5, 0, 1).astype(np.float32)
    ev = evidence(probs, masks)
    ours = average_precision(ev.positive.sum(0), ev.negative.sum(0))
    theirs = average_precision_score(masks.reshape(-1), _binned(probs).reshape(-1))
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert ours == pytest.approx(average_precision_score(masks.reshape(-1), probs.reshape(-1)), abs=0.01)


def test_weighted_auroc_with_unit_weights_is_sklearns():
    rng = np.random.default_rng(1)
    scores, labels = rng.random(30), rng.random(30) < 0.5
    scores[:4] = 0.5  # ties
    assert weighted_auroc(scores, labels, np.ones((1, 30)))[0] == pytest.approx(roc_auc_score(labels, scores))


def test_a_clearly_better_arm_is_better_and_identical_arms_are_not():
    rng = np.random.default_rng(2)
    masks, types = _test_set(rng)
    good_probs = [np.clip(masks * 0.7 + rng.random(masks.shape) * 0.3, 0, 1) for _ in range(3)]
    noise = [rng.random(masks.shape) for _ in range(3)]
    ev = {"real": [evidence(p, masks) for p in noise], "copy-paste": [evidence(p, masks) for p in noise],
          "generated": [evidence(p, masks) for p in good_probs]}
    rows = compare(ev, types, resamples=300)
    by = {(c["arm"], c["baseline"], c["metric"], c["type"]): c for c in rows}
    assert by[("generated", "real", "pixel_ap", "all")]["verdict"] == "better"
    assert by[("generated", "copy-paste", "pixel_ap", "spot")]["verdict"] == "better"
    same = by[("copy-paste", "real", "pixel_ap", "all")]
    assert same["difference"] == 0 and same["verdict"] == "no detectable difference"
    assert by[("real", "copy-paste", "image_auroc", "scratch")]["verdict"] == "no detectable difference"
    assert {c["type"] for c in rows} == {"all", "scratch", "spot"}


def test_compare_refuses_arms_with_different_seeds():
    rng = np.random.default_rng(3)
    masks, types = _test_set(rng)
    ev = evidence(rng.random(masks.shape), masks)
    with pytest.raises(ValueError, match="different numbers of seeds"):
        compare({"real": [ev, ev], "generated": [ev]}, types)


@pytest.mark.parametrize("low, high, expected", [(0.01, 0.2, "better"), (-0.3, -0.01, "worse"),
                                                 (-0.1, 0.1, "no detectable difference")])
def test_verdict(low, high, expected):
    assert verdict(low, high) == expected
