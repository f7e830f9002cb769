"""Scores of a segmenter on the test set, from scikit-learn: pixel AP, pixel AUROC, pixel F1-max, IoU at
the F1-max threshold, and image AUROC of the max-pooled score.

    python -c "import numpy as np; from defect_ds.downstream.scores import score; m = np.eye(8)[None]; print(score(m, m, np.ones(1, bool)))"
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, jaccard_score, precision_recall_curve, roc_auc_score

METRICS = ("pixel_ap", "pixel_auroc", "pixel_f1_max", "iou", "image_auroc")


def score(probs: np.ndarray, masks: np.ndarray, is_defect: np.ndarray) -> dict[str, float]:
    """probs float (N, H, W), masks 0/1 (N, H, W), is_defect bool (N,). Metrics that need both classes
    (a test set of defects only has no image AUROC) are NaN."""
    y, s = masks.reshape(-1).astype(bool), probs.reshape(-1)
    out = dict.fromkeys(METRICS, float("nan"))
    if y.any() and not y.all():
        out["pixel_ap"] = float(average_precision_score(y, s))
        out["pixel_auroc"] = float(roc_auc_score(y, s))
        precision, recall, thresholds = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        best = int(np.argmax(f1))
        out["pixel_f1_max"] = float(f1[best])
        out["iou"] = float(jaccard_score(y, s >= thresholds[best]))
    if is_defect.any() and not is_defect.all():
        out["image_auroc"] = float(roc_auc_score(is_defect, probs.reshape(len(probs), -1).max(axis=1)))
    return out


def score_by_type(probs: np.ndarray, masks: np.ndarray, types: list[str], good: str = "good"
                  ) -> dict[str, dict[str, float]]:
    """"all" over the whole test set, and per defect type over that type's images plus every good image
    (so false alarms on good parts count against every type)."""
    types_arr = np.array(types)
    is_defect = types_arr != good
    out = {"all": score(probs, masks, is_defect)}
    for t in sorted(set(types) - {good}):
        keep = (types_arr == t) | ~is_defect
        out[t] = score(probs[keep], masks[keep], is_defect[keep])
    return out
