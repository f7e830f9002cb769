"""downstream.json, downstream.md, a bar plot of the arms and (for segmenters) a grid of test images with
true and predicted masks.

    python -c "from defect_ds.downstream.report import summarise; print(summarise([{'all': {'pixel_ap': 0.5}}]))"
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from defect_ds.utils.files import atomic_write_text

MAIN_METRIC = {"segment": "pixel_ap", "classify": "image_auroc"}  # the console line's and the verdicts' metric
INSPECTOR = {"segment": "Segmenters", "classify": "Classifiers"}


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {metric: {"mean", "std"}}} over seeds (std 0 for one seed; NaN metrics stay NaN); the metrics
    are those of the first seed's scores."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in per_seed[0]:
        out[group] = {}
        for metric in per_seed[0][group]:
            values = np.array([s[group].get(metric, math.nan) for s in per_seed], dtype=float)
            out[group][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return out


def _interval(c: dict) -> str:
    return f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def _task(results: dict) -> str:
    return results["settings"].get("task", "segment")  # results written before the classify task: segment


def _metrics(results: dict) -> list[str]:
    return list(next(iter(results["arms"].values()))["summary"]["all"])


def verdict_sentence(results: dict, metric: str | None = None) -> str:
    """One line of verdicts on `metric` (default: the task's main one) over all test images: each arm
    against each baseline."""
    metric = metric or MAIN_METRIC[_task(results)]
    rows = [c for c in results.get("comparisons", []) if c["metric"] == metric and c["type"] == "all"]
    if not rows:
        return "No paired comparison (one arm)."
    return f"Paired {metric} differences, 95% interval: " + "; ".join(
        f"{c['arm']} vs {c['baseline']} {_interval(c)} {c['verdict']}" for c in rows) + "."


def comparison_table(comparisons: list[dict], metric: str) -> list[str]:
    """Markdown rows: arm against baseline, the difference and its interval per type."""
    rows = [c for c in comparisons if c["metric"] == metric]
    types = list(dict.fromkeys(c["type"] for c in rows))
    pairs = list(dict.fromkeys((c["baseline"], c["arm"]) for c in rows))
    by = {(c["baseline"], c["arm"], c["type"]): c for c in rows}
    lines = ["| arm | against | " + " | ".join(types) + " |", "|---|---" + "|---" * len(types) + "|"]
    for baseline, arm in pairs:
        cells = []
        for t in types:
            c = by.get((baseline, arm, t))
            cells.append("n/a" if c is None else f"{_interval(c)} **{c['verdict']}**" if c["verdict"] != NO_DIFF
                         else f"{_interval(c)} {c['verdict']}")
        lines.append(f"| {arm} | {baseline} | " + " | ".join(cells) + " |")
    return lines


NO_DIFF = "no detectable difference"


def _cell(stat: dict[str, float]) -> str:
    return "n/a" if math.isnan(stat["mean"]) else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _provenance(results: dict) -> list[str]:
    """Lines naming how the generated pairs were drawn and where this ran (older results have neither)."""
    lines = []
    gen = results.get("generation")
    if gen:
        keys = ("mode", "mask_source", "guidance_scale", "steps", "scheduler", "strength", "precision", "export_step",
                "base_model")
        lines += ["Generated pairs: " + ", ".join(f"{k} {gen[k]}" for k in keys if k in gen) + ".", ""]
    env = results.get("environment")
    if env:
        lines += [f"Device: {env['device']}, {env['threads']} threads, load average "
                  f"{'/'.join(f'{x:.2f}' for x in env['load_average'])} at the end; python {env['python']}, "
                  f"torch {env['torch']}, scikit-learn {env['scikit_learn']}.", ""]
    return lines


def write_markdown(results: dict, path: Path) -> None:
    arms, metrics = results["arms"], _metrics(results)
    lines = [f"# Does it help? {INSPECTOR[_task(results)]} trained per arm, scored on held-out real defects", "",
             f"Settings: {json.dumps(results['settings'], sort_keys=True)}", "",
             *_provenance(results),
             f"Mean ± spread (std) over {results['settings']['seeds']} seeds; test set: "
             f"{results['test']['defect_images']} defect images, {results['test']['good_images']} good images.", "",
             "| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, record in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(record["summary"]["all"][m]) for m in metrics) + " |")
    comparisons = results.get("comparisons", [])
    for metric in dict.fromkeys(c["metric"] for c in comparisons):
        lines += ["", f"## Paired differences in {metric} (arm minus baseline, 95% bootstrap interval over test "
                  "images and seeds)", "", *comparison_table(comparisons, metric)]
    lines += ["", verdict_sentence(results)]
    types = [g for g in next(iter(arms.values()))["summary"] if g != "all"]
    for t in types:
        lines += ["", f"## {t} (its test images plus every good test image)", "",
                  "| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for arm, record in arms.items():
            lines.append(f"| {arm} | " + " | ".join(_cell(record["summary"][t][m]) for m in metrics) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_bar_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, metrics = list(results["arms"]), _metrics(results)
    x = np.arange(len(metrics))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, arm in enumerate(arms):
        summary = results["arms"][arm]["summary"]["all"]
        ax.bar(x + i * width - 0.4 + width / 2, [summary[m]["mean"] for m in metrics], width,
               yerr=[summary[m]["std"] for m in metrics], capsize=3, label=arm)
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score on held-out real defects")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(arms), fontsize=8, frameon=False)  # off the bars
    ax.set_title(f"{INSPECTOR[_task(results)][:-1]} per arm, mean and std over {results['settings']['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_prediction_grid(images: np.ndarray, masks: np.ndarray, predictions: dict[str, np.ndarray],
                          path: Path) -> None:
    """Rows: test images; columns: image, true mask, each arm's predicted probability."""
    from PIL import Image, ImageDraw

    size = images.shape[1]
    columns = ["image", "true mask", *predictions]
    label_h = 14
    canvas = Image.new("RGB", (len(columns) * (size + 2), label_h + len(images) * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((c * (size + 2) + 1, 1), name[:size // 6], fill="black")
    for r in range(len(images)):
        tiles = [images[r], np.repeat(masks[r][..., None] * 255, 3, -1)]
        tiles += [np.repeat((p[r] * 255).astype(np.uint8)[..., None], 3, -1) for p in predictions.values()]
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile.astype(np.uint8)), (c * (size + 2), label_h + r * (size + 2)))
    canvas.save(path)
