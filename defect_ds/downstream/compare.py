"""Paired differences between arms with 95% bootstrap intervals over test images and seeds.

    python -c "from defect_ds.downstream.compare import verdict; print(verdict(0.01, 0.05))"

Every arm is trained with the same seeds and scored on the same test images, so arms are compared in
pairs: one resample draws test images (defect and good images separately, with replacement) and seeds
(with replacement), and the difference of the two arms' mean score over the drawn seeds, both scored on
the drawn images, is one draw of the difference. The 2.5th and 97.5th percentiles of the draws are the
interval; an interval that excludes zero is a verdict, anything else is "no detectable difference".

Pixel AP of a resample is computed from per-image counts of defect and good pixels in score bins
(uniform in logit, BINS of them), so a resample is one matrix product instead of a sort of every pixel;
on the bins' edges the binned AP equals scikit-learn's AP of the binned scores (tested). A classifier's
evidence is the same with one "pixel" per image (`image_evidence`): its binned AP is image AP, and the
accuracy at the F1-max threshold of a resample comes from the same cumulative counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 1024
LOGIT_RANGE = 12.0
METRICS = ("pixel_ap", "image_auroc")
CLASSIFY_METRICS = ("image_ap", "image_auroc", "accuracy")
GOOD = "good"


@dataclass
class Evidence:
    """What one trained segmenter (an arm and a seed) did on the test set, reduced to what scores need."""
    positive: np.ndarray  # (N, BINS) defect-pixel counts per score bin, highest scores first
    negative: np.ndarray  # (N, BINS) good-pixel counts per score bin
    image_score: np.ndarray  # (N,) the max-pooled score of each image


def bin_index(probs: np.ndarray) -> np.ndarray:
    """Bin of each probability: 0 for the highest scores, BINS - 1 for the lowest."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    logit = np.log(p) - np.log1p(-p)
    edge = np.clip((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS, 0, BINS - 1).astype(np.int64)
    return BINS - 1 - edge


def evidence(probs: np.ndarray, masks: np.ndarray) -> Evidence:
    """probs float (N, H, W), masks 0/1 (N, H, W)."""
    n = len(probs)
    bins = bin_index(probs).reshape(n, -1)
    defect = masks.reshape(n, -1).astype(bool)
    offset = (np.arange(n) * BINS)[:, None]
    positive = np.bincount((bins + offset)[defect], minlength=n * BINS).reshape(n, BINS)
    negative = np.bincount((bins + offset)[~defect], minlength=n * BINS).reshape(n, BINS)
    return Evidence(positive.astype(np.float32), negative.astype(np.float32), probs.reshape(n, -1).max(axis=1))


def image_evidence(probs: np.ndarray, is_defect: np.ndarray) -> Evidence:
    """A classifier's evidence: probs float (N,) per image, is_defect bool (N,); each image one pixel."""
    return evidence(probs.reshape(-1, 1, 1), is_defect.reshape(-1, 1, 1))


def accuracy_at_f1_max(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Accuracy at the threshold (a bin edge) of the best F1, from (R, BINS) defect/good image counts per bin."""
    tp, fp = np.cumsum(positive, axis=-1), np.cumsum(negative, axis=-1)
    n_pos, n_neg = tp[..., -1:], fp[..., -1:]
    f1 = 2 * tp / np.maximum(tp + fp + n_pos, 1e-12)
    best = np.argmax(f1, axis=-1)[..., None]
    correct = np.take_along_axis(tp, best, -1) + n_neg - np.take_along_axis(fp, best, -1)
    return (correct / (n_pos + n_neg))[..., 0]


def average_precision(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AP of (R, BINS) defect/good pixel counts per bin, highest scores first: sum over thresholds of
    recall gained times precision at that threshold (scikit-learn's definition). NaN without defect pixels."""
    tp, fp = np.cumsum(positive, axis=-1), np.cumsum(negative, axis=-1)
    total = tp[..., -1:]
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    recall_gain = positive / np.where(total > 0, total, np.nan)
    return (recall_gain * precision).sum(axis=-1)


def weighted_auroc(scores: np.ndarray, is_defect: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Image AUROC for each row of weights (R, N) (how often each image was drawn); ties count one half."""
    pos, neg = scores[is_defect], scores[~is_defect]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    wp, wn = weights[:, is_defect], weights[:, ~is_defect]
    num = np.einsum("rp,pn,rn->r", wp, wins, wn)
    return num / (wp.sum(1) * wn.sum(1))


def score(ev: Evidence, metric: str, weights: np.ndarray, is_defect: np.ndarray) -> np.ndarray:
    """`metric` of one segmenter on each resample of test images (weights (R, N))."""
    if metric in ("pixel_ap", "image_ap"):  # image_ap: a classifier's evidence (see image_evidence)
        return average_precision(weights @ ev.positive, weights @ ev.negative)
    if metric == "accuracy":
        return accuracy_at_f1_max(weights @ ev.positive, weights @ ev.negative)
    if metric == "image_auroc":
        return weighted_auroc(ev.image_score, is_defect, weights)
    raise ValueError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS + CLASSIFY_METRICS)}.")


def image_resamples(is_defect: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples + 1, N) draw counts: row 0 is the test set itself, then defect and good images
    resampled separately with replacement, so each resample keeps the test set's class balance."""
    weights = np.zeros((resamples + 1, len(is_defect)), np.float32)
    weights[0] = 1
    for side in (is_defect, ~is_defect):
        idx = np.flatnonzero(side)
        if len(idx):
            draws = rng.integers(len(idx), size=(resamples, len(idx)))
            np.add.at(weights[1:], (np.arange(resamples)[:, None], idx[draws]), 1)
    return weights


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


def compare(evidence_by_arm: dict[str, list[Evidence]], types: list[str], *,
            baselines: tuple[str, ...] = ("real", "copy-paste"), metrics: tuple[str, ...] = METRICS,
            resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Every arm against every baseline present (not itself): the paired difference (arm minus baseline,
    mean over seeds) and its 95% bootstrap interval, overall ("all") and per defect type (that type's test
    images and every good one). Arms must share their seeds, in the same order."""
    arms = list(evidence_by_arm)
    seeds = {len(v) for v in evidence_by_arm.values()}
    if len(seeds) != 1:
        raise ValueError(f"Arms were trained on different numbers of seeds ({sorted(seeds)}); compare needs pairs.")
    n_seeds = seeds.pop()
    types_arr = np.array(types)
    groups = {"all": np.ones(len(types), bool)} | {t: (types_arr == t) | (types_arr == GOOD)
                                                    for t in sorted(set(types) - {GOOD})}
    rng = np.random.default_rng(seed)
    seed_draws = np.zeros((resamples + 1, n_seeds), np.float32)
    seed_draws[0] = 1
    np.add.at(seed_draws[1:], (np.arange(resamples)[:, None], rng.integers(n_seeds, size=(resamples, n_seeds))), 1)
    seed_draws /= n_seeds
    out = []
    for group, keep in groups.items():
        is_defect = types_arr[keep] != GOOD
        weights = image_resamples(is_defect, resamples, rng)
        for metric in metrics:
            if metric in ("image_auroc", "accuracy") and (is_defect.all() or not is_defect.any()):
                continue
            per_arm = {arm: np.stack([score(_subset(ev, keep), metric, weights, is_defect)
                                      for ev in evidence_by_arm[arm]], axis=1) for arm in arms}  # (R+1, seeds)
            for arm in arms:
                for baseline in baselines:
                    if baseline == arm or baseline not in per_arm:
                        continue
                    draws = (seed_draws * (per_arm[arm] - per_arm[baseline])).sum(axis=1)
                    low, high = np.nanpercentile(draws[1:], [2.5, 97.5])
                    out.append({"arm": arm, "baseline": baseline, "metric": metric, "type": group,
                                "difference": round(float(draws[0]), 4), "ci_low": round(float(low), 4),
                                "ci_high": round(float(high), 4), "verdict": verdict(low, high)})
    return out


def _subset(ev: Evidence, keep: np.ndarray) -> Evidence:
    return Evidence(ev.positive[keep], ev.negative[keep], ev.image_score[keep])
