"""Scores on the test set, from scikit-learn. A segmenter: pixel AP, pixel AUROC, pixel F1-max, IoU at
the F1-max threshold, and image AUROC of the max-pooled score. A classifier: image AUROC, image AP,
image F1-max and accuracy at the F1-max threshold.

    python -c "import numpy as np; from defect_ds.downstream.scores import score; m = np.eye(8)[None]; print(score(m, m, np.ones(1, bool)))"
    python -c "import numpy as np; from defect_ds.downstream.scores import classify_score as c; print(c(np.array([.9, .2, .4]), np.array([True, False, False])))"
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, jaccard_score, precision_recall_curve, roc_auc_score

METRICS = ("pixel_ap", "pixel_auroc", "pixel_f1_max", "iou", "image_auroc")
CLASSIFY_METRICS = ("image_auroc", "image_ap", "image_f1_max", "accuracy")


def f1_max(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The best F1 over thresholds of the scores s for the bool labels y, and the threshold that gives it."""
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def score(probs: np.ndarray, masks: np.ndarray, is_defect: np.ndarray) -> dict[str, float]:
    """probs float (N, H, W), masks 0/1 (N, H, W), is_defect bool (N,). Metrics that need both classes
    (a test set of defects only has no image AUROC) are NaN."""
    y, s = masks.reshape(-1).astype(bool), probs.reshape(-1)
    out = dict.fromkeys(METRICS, float("nan"))
    if y.any() and not y.all():
        out["pixel_ap"] = float(average_precision_score(y, s))
        out["pixel_auroc"] = float(roc_auc_score(y, s))
        out["pixel_f1_max"], threshold = f1_max(y, s)
        out["iou"] = float(jaccard_score(y, s >= threshold))
    if is_defect.any() and not is_defect.all():
        out["image_auroc"] = float(roc_auc_score(is_defect, probs.reshape(len(probs), -1).max(axis=1)))
    return out


def classify_score(probs: np.ndarray, is_defect: np.ndarray) -> dict[str, float]:
    """probs float (N,) defect probability per image, is_defect bool (N,); NaN without both classes."""
    out = dict.fromkeys(CLASSIFY_METRICS, float("nan"))
    if is_defect.any() and not is_defect.all():
        out["image_auroc"] = float(roc_auc_score(is_defect, probs))
        out["image_ap"] = float(average_precision_score(is_defect, probs))
        out["image_f1_max"], threshold = f1_max(is_defect, probs)
        out["accuracy"] = float(np.mean((probs >= threshold) == is_defect))
    return out


def score_by_type(probs: np.ndarray, masks: np.ndarray, types: list[str], good: str = "good",
                  task: str = "segment") -> dict[str, dict[str, float]]:
    """"all" over the whole test set, and per defect type over that type's images plus every good image
    (so false alarms on good parts count against every type). task "classify": probs are per image (N,)."""
    types_arr = np.array(types)
    is_defect = types_arr != good
    groups = {"all": np.ones(len(types), bool)} | {t: (types_arr == t) | ~is_defect for t in sorted(set(types) - {good})}
    if task == "classify":
        return {name: classify_score(probs[keep], is_defect[keep]) for name, keep in groups.items()}
    return {name: score(probs[keep], masks[keep], is_defect[keep]) for name, keep in groups.items()}
