"""`defect-ds evaluate`: FID, KID and IS of generated against real defect images, plus mask and diversity scores.

    defect-ds evaluate work/gen --real work/data --inception-weights work/weights-inception-2015-12-05-6726825d.pth

Offline by design. torch-fidelity's Inception weights come from a local file (--inception-weights,
$DEFECT_DS_INCEPTION_WEIGHTS, or torch hub's checkpoints folder where torch-fidelity itself would put
them). No file given to the command is unpickled: weights are read with `torch.load(weights_only=True)`
into the network's expected state dict, and torch-fidelity gets only the loaded network (it would
otherwise `torch.load` the file with `weights_only=False`, letting a crafted file run code). Features are
extracted once per (image set, defect type) by torch-fidelity and cached as .safetensors (tensors only,
nothing to execute) under a key made of a hash of the pixels and a hash of the weights file, so changing
either recomputes. FID, KID and IS come from torch-fidelity's own functions, per defect type and over
all types together.

Mask localisation: the share of the pixel change from the source image that lies inside the mask
(inpainted samples), after compositing (1.0 by construction) and before it (the model's own, recorded
by `defect-ds generate`). Diversity: IC-LPIPS (Ojha et al., 2021: each generated image joins the cluster
of its nearest real image by LPIPS, among 10 real images of its type drawn by a seeded sample, then the
mean pairwise LPIPS within clusters) when LPIPS weights are
available locally (--lpips-weights); always also `masked_pixel_diversity`, the mean absolute pixel
difference inside the masks between pairs of generated images, which is cheap and is not LPIPS.
Masks: area, elongation, components and position on the object, generated against real per type
(`mask_stats.py`).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from defect_ds.data.reader import iter_dataset, load_mask, load_rgb
from defect_ds.evaluate.mask_stats import compare_masks, save_mask_figure
from defect_ds.evaluate.report import markdown_report, save_pair_grid
from defect_ds.utils.device import resolve_device
from defect_ds.utils.files import atomic_write_json, atomic_write_text

ENV_INCEPTION = "DEFECT_DS_INCEPTION_WEIGHTS"
ENV_LPIPS = "DEFECT_DS_LPIPS_WEIGHTS"
ENV_CACHE = "DEFECT_DS_FIDELITY_CACHE"
INCEPTION_NAME = "inception-v3-compat"
FEATURES = ["2048", "logits_unbiased"]  # FID/KID features, IS logits
MAX_CLUSTER_MEMBERS = 100  # IC-LPIPS pairs per cluster grow quadratically
NUM_CLUSTER_CENTRES = 10  # IC-LPIPS clusters per defect type (Ojha et al. use 10)


# ---- weights ---------------------------------------------------------------------------------

def inception_weights_default() -> Path:
    """Where torch-fidelity would download its Inception weights: torch hub's checkpoints folder."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]


def resolve_inception_weights(path: str | None) -> Path:
    """The Inception weights file from the flag, else the environment, else torch hub's folder."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    given = path or os.environ.get(ENV_INCEPTION)
    if given:
        if not Path(given).is_file():
            origin = "--inception-weights" if path else f"${ENV_INCEPTION}"
            raise FileNotFoundError(f"The Inception weights file {given} (from {origin}) does not exist; "
                                    f"download {URL_INCEPTION_V3} on a machine with internet and point "
                                    f"{origin} at it.")
        return Path(given)
    default = inception_weights_default()
    if default.is_file():
        return default
    raise FileNotFoundError(f"No Inception weights file (evaluation runs offline): download {URL_INCEPTION_V3} "
                            f"and pass --inception-weights PATH, set ${ENV_INCEPTION}, or put it at {default}.")


def _inception_module():
    """torch-fidelity's Inception network with its random init: the class loads weights in its constructor,
    so a subclass skips that load, and the file it reads first is our own empty one."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load: keep the random init
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return _Unloaded(INCEPTION_NAME, FEATURES, feature_extractor_weights_path=str(empty))


def read_state_dict(path: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read with weights_only=True: a crafted pickle cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError, RuntimeError, EOFError, ...: all one answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} ({flag}) is not a plain weights file and is not unpickled ({reason}); pass "
                         "the published file.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} ({flag}) holds no state dict of tensors; pass the published file.")
    return state


def build_inception(weights: str | Path, cuda: bool):
    """torch-fidelity's Inception feature extractor with the tensors of `weights` (never unpickled)."""
    model = _inception_module()
    try:
        torch.nn.Module.load_state_dict(model, read_state_dict(weights, "--inception-weights"), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not hold torch-fidelity's Inception weights ({str(e).splitlines()[0]}); "
                         "pass weights-inception-2015-12-05-6726825d.pth.") from None
    model.requires_grad_(False)
    model.eval()
    return model.cuda() if cuda else model


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A random-init state dict of torch-fidelity's Inception, for offline tests of the pipeline.

    Convolutions get He-normal init so that features keep their scale through the depth and still
    tell images apart.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _inception_module()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    torch.save(model.state_dict(), path)
    return path


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def images_digest(images: list[np.ndarray]) -> str:
    """A hash of the pixels (and shapes) of an ordered list of images."""
    h = hashlib.sha256()
    for image in images:
        h.update(str(image.shape).encode())
        h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def load_lpips(weights_dir: str | Path, cuda: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """torch-fidelity's LPIPS (VGG16) from two local files; returns distance(uint8 a, uint8 b) -> (B,).

    The folder must hold the files torch-fidelity and torchvision would download:
    weights-vgg16-lpips.pth (the LPIPS linear layers) and vgg16-397923af.pth (VGG16 ImageNet). They
    are offered to both as torch hub's checkpoint cache, so nothing is downloaded.
    """
    from torch_fidelity.sample_similarity_lpips import URL_VGG16_LPIPS, SampleSimilarityLPIPS
    from torchvision.models import VGG16_Weights

    folder = Path(weights_dir)
    names = [URL_VGG16_LPIPS.rsplit("/", 1)[1], VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; download {URL_VGG16_LPIPS} and "
                                f"{VGG16_Weights.IMAGENET1K_V1.url} into it.")
    old_hub = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        for n in names:  # torch-fidelity and torchvision unpickle what they find: only our re-saved tensors
            torch.save(read_state_dict(folder / n, "--lpips-weights"), Path(hub) / "checkpoints" / n)
        torch.hub.set_dir(hub)
        try:
            model = SampleSimilarityLPIPS("lpips-vgg16", sample_similarity_resize=None,
                                          sample_similarity_dtype="uint8")
        finally:
            torch.hub.set_dir(old_hub)
    model = model.eval().to("cuda" if cuda else "cpu")

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(a.to(device), b.to(device)).float().cpu().reshape(-1)

    return distance


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference in [0, 1] of uint8 (B, 3, H, W) batches; a stand-in, not LPIPS."""
    return (a.float() - b.float()).abs().mean(dim=(1, 2, 3)) / 255


# ---- metrics ---------------------------------------------------------------------------------

class _ImageSet(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors, what torch-fidelity's feature extractors take."""

    def __init__(self, images: list[np.ndarray]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()


def fidelity_kwargs(batch_size: int, cuda: bool) -> dict:
    """torch-fidelity's own cache is off: it pickles (torch.save) and unpickles (weights_only=False) its
    entries, so anyone who can write the cache folder could run code; `extract_features` caches instead."""
    return dict(cache=False, batch_size=batch_size, cuda=cuda, verbose=False, save_cpu_ram=not cuda)


def extract_features(extractor, images: list[np.ndarray], cache_name: str, kwargs: dict, cache_dir: Path) -> dict:
    """torch-fidelity features {"2048": (N, 2048), "logits_unbiased": (N, 1008)}, cached under cache_name
    as .safetensors, a format that holds tensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file
    from torch_fidelity.utils import extract_featuresdict_from_input_id

    path = cache_dir / f"{cache_name}-features.safetensors"
    if path.is_file():
        try:
            cached = load_file(path)
            if set(cached) == set(FEATURES):
                return cached
        except (SafetensorError, OSError):
            pass  # a damaged entry is recomputed and replaced
    features = extract_featuresdict_from_input_id(1, extractor, input1=_ImageSet(images), **kwargs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: features[k].contiguous().cpu() for k in FEATURES}, str(partial))
    partial.replace(path)  # a cache entry that exists is complete
    return features


def fidelity_metrics(gen: dict, real: dict | None, gen_name: str, real_name: str, extractor, kwargs: dict, *,
                     kid_subset_size: int, kid_subsets: int, isc_splits: int) -> tuple[dict, list[str]]:
    """FID, KID (mean, std) and IS (mean, std) by torch-fidelity from features; notes say what was skipped."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics_cached, \
        fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric

    out: dict = {"fid": None, "kid_mean": None, "kid_std": None, "is_mean": None, "is_std": None}
    notes = []
    n_gen = len(gen["2048"])
    if n_gen >= 1:
        isc = isc_featuresdict_to_metric(gen, "logits_unbiased", **{**kwargs, "isc_splits": min(isc_splits, n_gen)})
        out.update(is_mean=isc[KEY_METRIC_ISC_MEAN], is_std=isc[KEY_METRIC_ISC_STD])
    n_real = 0 if real is None else len(real["2048"])
    if n_gen < 2 or n_real < 2:
        notes.append(f"FID and KID need 2 or more images on each side (generated {n_gen}, real {n_real})")
        return out, notes
    stats = [fid_featuresdict_to_statistics_cached(f, name, extractor, "2048", **kwargs)
             for f, name in ((gen, gen_name), (real, real_name))]
    out["fid"] = fid_statistics_to_metric(stats[0], stats[1], False)[KEY_METRIC_FID]
    subset = min(kid_subset_size, n_gen, n_real)
    if subset < kid_subset_size:
        notes.append(f"KID subset size lowered from {kid_subset_size} to {subset} (the smaller set's size)")
    kid = kid_featuresdict_to_metric(gen, real, "2048", **{**kwargs, "kid_subset_size": subset,
                                                           "kid_subsets": kid_subsets})
    out.update(kid_mean=kid[KEY_METRIC_KID_MEAN], kid_std=kid[KEY_METRIC_KID_STD])
    if min(n_gen, n_real) < 2048:
        notes.append(f"FID from fewer than 2048 images per side ({min(n_gen, n_real)}) is biased upward; "
                     "compare it only between runs of the same sizes")
    return out, notes


def mask_localisation(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float | None:
    """The share of the absolute pixel change from `source` that lies inside `mask` (None: no change)."""
    changed = np.abs(image.astype(np.int32) - source.astype(np.int32)).sum(-1)
    total = changed.sum()
    return float((changed * mask.astype(bool)).sum() / total) if total > 0 else None


def masked_pixel_diversity(images: list[np.ndarray], masks: list[np.ndarray]) -> float | None:
    """Mean over pairs of the mean absolute pixel difference (0..1) inside the union of their masks."""
    values = []
    n = min(len(images), MAX_CLUSTER_MEMBERS)
    for i in range(n):
        for j in range(i + 1, n):
            union = (masks[i] | masks[j]).astype(bool)
            if union.any():
                diff = np.abs(images[i].astype(np.int16) - images[j].astype(np.int16)).mean(-1)
                values.append(float(diff[union].mean() / 255))
    return float(np.mean(values)) if values else None


def cluster_centres(real: list[np.ndarray], k: int = NUM_CLUSTER_CENTRES, seed: int = 0) -> list[np.ndarray]:
    """k real images drawn by a seeded sample across the whole set, in set order.

    Not the first k: a set in key order is often grouped (by category, by source file), and centres
    from one corner of it would put every generated image in few clusters."""
    if len(real) <= k:
        return list(real)
    picked = np.random.default_rng(seed).choice(len(real), size=k, replace=False)
    return [real[i] for i in sorted(picked)]


def ic_lpips(generated: list[np.ndarray], centres: list[np.ndarray],
             distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float | None:
    """Intra-cluster diversity: generated images join their nearest centre; mean pairwise distance per
    cluster (of two or more members), averaged over clusters. None when no cluster has two members."""
    if not centres or len(generated) < 2:
        return None
    to_t = lambda img: torch.from_numpy(img).permute(2, 0, 1)[None]  # noqa: E731
    gen_t = torch.cat([to_t(g) for g in generated])
    cen_t = torch.cat([to_t(c) for c in centres])
    dist = torch.stack([distance(gen_t, cen_t[k:k + 1].expand_as(gen_t)) for k in range(len(centres))], 1)
    nearest = dist.argmin(1)
    scores = []
    for k in range(len(centres)):
        members = torch.nonzero(nearest == k).flatten()[:MAX_CLUSTER_MEMBERS]
        if len(members) < 2:
            continue
        i, j = torch.triu_indices(len(members), len(members), 1)
        scores.append(float(distance(gen_t[members[i]], gen_t[members[j]]).mean()))
    return float(np.mean(scores)) if scores else None


# ---- the evaluation --------------------------------------------------------------------------

def load_set(path: str | Path, size: int | None, splits: tuple[str, ...] | None = None) -> list[dict]:
    """{"image", "mask", "source", "defect_type", "meta"} per sample, images resized to `size`."""
    out = []
    for s in iter_dataset(path, splits):
        image = load_rgb(s["image"], size)
        r = image.shape[0]
        out.append({"key": s["key"], "image": image, "defect_type": s["meta"].get("defect_type", "all"),
                    "mask": load_mask(s["mask"], r) if s["mask"] is not None else None,
                    "source": load_rgb(s["source"], r) if s["source"] is not None else None, "meta": s["meta"]})
    if not out:
        raise FileNotFoundError(f"{path} holds no images; pass a generated folder, a shards folder or a folder "
                                "of images.")
    return out


def evaluate(generated: str | Path, real: str | Path, out_dir: str | Path, *, inception_weights: str | None = None,
             lpips_weights: str | None = None, cache_dir: str | Path | None = None,
             real_splits: tuple[str, ...] | None = None, resolution_px: int = 0, batch_size: int = 32,
             kid_subset_size: int = 1000, kid_subsets: int = 100, isc_splits: int = 10,
             device: str = "auto", grid_per_row: int = 8) -> dict:
    """Scores the generated images against the real ones (`score_sets`), then writes report.json, report.md,
    grid.png and masks.png to out_dir (`write_report`); returns the report."""
    weights = resolve_inception_weights(inception_weights)  # fail before any image is read
    lpips_dir = lpips_weights or os.environ.get(ENV_LPIPS)
    cuda = resolve_device(device).type == "cuda"
    extractor = build_inception(weights, cuda)  # read as tensors only; a crafted file stops here
    cache_dir = Path(cache_dir or os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "defect_ds" / "fidelity")

    first = next(iter_dataset(generated), None)
    if first is None:
        raise FileNotFoundError(f"{generated} holds no images; pass a `defect-ds generate` output folder.")
    size = resolution_px or min(load_rgb(first["image"]).shape[:2])
    gen = load_set(generated, size)
    real_all = load_set(real, size, real_splits)
    report: dict = {"generated": str(generated), "real": str(real), "inception_weights": str(weights),
                    "inception_weights_sha256": file_digest(weights), "resolution_px": size}
    lpips_distance, lpips_reason = None, ""
    if lpips_dir:
        try:
            lpips_distance = load_lpips(lpips_dir, cuda)
        except FileNotFoundError as e:
            lpips_reason = str(e)
    else:
        lpips_reason = f"no LPIPS weights: pass --lpips-weights DIR or set ${ENV_LPIPS}"
    scorer = Scorer(extractor, report["inception_weights_sha256"], fidelity_kwargs(batch_size, cuda), cache_dir,
                    kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, isc_splits=isc_splits,
                    lpips_distance=lpips_distance, lpips_reason=lpips_reason)
    comparison = score_sets(report, gen, real_all, scorer)
    write_report(report, comparison, gen, real_all, Path(out_dir), cell_px=max(128, min(256, size)),
                 per_row=grid_per_row)
    return report


class Scorer:
    """Scores of a selection of defect types: FID, KID and IS by torch-fidelity on features extracted once
    per (side, defect type) and cached, mask localisation, masked pixel diversity and IC-LPIPS."""

    def __init__(self, extractor, weights_digest: str, kwargs: dict, cache_dir: Path, *, kid_subset_size: int,
                 kid_subsets: int, isc_splits: int,
                 lpips_distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, lpips_reason: str):
        self.extractor, self.weights_digest, self.kwargs, self.cache_dir = extractor, weights_digest, kwargs, cache_dir
        self.kid_subset_size, self.kid_subsets, self.isc_splits = kid_subset_size, kid_subsets, isc_splits
        self.lpips_distance, self.lpips_reason = lpips_distance, lpips_reason
        self.features: dict[str, dict] = {}  # "gen/<type>", "real/<type>" -> torch-fidelity features
        self.names: dict[str, str] = {}  # the same keys -> cache names (pixels hash + weights hash)

    def extract(self, sets: dict[str, list[dict]], types: list[str]) -> None:
        """Features of each side ("gen", "real") and defect type that has images."""
        for side, items in sets.items():
            for t in types:
                images = [s["image"] for s in items if s["defect_type"] == t]
                if images:
                    key = f"{side}/{t}"
                    self.names[key] = f"defectds-{images_digest(images)[:24]}-{self.weights_digest[:12]}"
                    self.features[key] = extract_features(self.extractor, images, self.names[key], self.kwargs,
                                                          self.cache_dir)

    def scores(self, selected: list[str], gen_items: list[dict], real_items: list[dict]) -> dict:
        m, notes = fidelity_metrics(self._features("gen", selected), self._features("real", selected),
                                    self._name("gen", selected), self._name("real", selected), self.extractor,
                                    self.kwargs, kid_subset_size=self.kid_subset_size, kid_subsets=self.kid_subsets,
                                    isc_splits=self.isc_splits)
        m.update(num_generated=len(gen_items), num_real=len(real_items))
        loc = [mask_localisation(s["image"], s["source"], s["mask"]) for s in gen_items
               if s["source"] is not None and s["mask"] is not None]
        loc = [v for v in loc if v is not None]
        m["mask_localisation"] = float(np.mean(loc)) if loc else None
        raw = [s["meta"].get("generation", {}).get("mask_localisation_before_composite") for s in gen_items]
        raw = [v for v in raw if v is not None]
        m["mask_localisation_before_composite"] = float(np.mean(raw)) if raw else None
        with_masks = [s for s in gen_items if s["mask"] is not None]
        m["masked_pixel_diversity"] = masked_pixel_diversity([s["image"] for s in with_masks],
                                                             [s["mask"] for s in with_masks])
        if self.lpips_distance is not None:
            per_type = [ic_lpips([s["image"] for s in gen_items if s["defect_type"] == t],
                                 cluster_centres([s["image"] for s in real_items if s["defect_type"] == t]),
                                 self.lpips_distance)
                        for t in selected]
            per_type = [v for v in per_type if v is not None]
            m["ic_lpips"] = float(np.mean(per_type)) if per_type else None
        else:
            m["ic_lpips"] = None
            m["ic_lpips_unavailable"] = self.lpips_reason
        m["notes"] = notes
        return m

    def _features(self, side: str, selected: list[str]) -> dict | None:
        return _concat([self.features[f"{side}/{t}"] for t in selected if f"{side}/{t}" in self.features])

    def _name(self, side: str, selected: list[str]) -> str:
        joined = "+".join(self.names.get(f"{side}/{t}", "") for t in selected)
        return f"defectds-{hashlib.sha256(joined.encode()).hexdigest()[:24]}-{self.weights_digest[:12]}"


def score_sets(report: dict, gen: list[dict], real: list[dict], scorer: Scorer) -> dict:
    """Adds the scores per defect type and over all types, notes and mask statistics to `report` (whose
    "real" names the real set); returns the mask comparison, for the figure."""
    types = sorted({g["defect_type"] for g in gen})
    report.update(per_defect_type={}, notes=[])
    scorer.extract({"gen": gen, "real": real}, types)
    for t in types:
        report["per_defect_type"][t] = scorer.scores([t], [s for s in gen if s["defect_type"] == t],
                                                     [s for s in real if s["defect_type"] == t])
    report["overall"] = scorer.scores(types, gen, [s for s in real if s["defect_type"] in types])
    missing = [t for t in types if f"real/{t}" not in scorer.features]
    if missing:
        report["notes"].append(f"no real images of {', '.join(missing)} in {report['real']}; their FID/KID are n/a")
    if scorer.lpips_distance is None:
        report["notes"].append(f"IC-LPIPS not computed: {scorer.lpips_reason}")
    comparison = compare_masks(gen, real, types)  # do the generated masks look like the real ones?
    report["masks"] = {t: {side: e[side] for side in ("generated", "real")} for t, e in comparison.items()}
    return comparison


def write_report(report: dict, comparison: dict, gen: list[dict], real: list[dict], out_dir: Path, *,
                 cell_px: int, per_row: int) -> None:
    """grid.png (generated and real images per type, masks outlined), masks.png, report.json and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in report["per_defect_type"]:
        rows.append((f"{t}: generated", [(s["image"], s["mask"]) for s in gen if s["defect_type"] == t][:per_row]))
        real_t = [(s["image"], s["mask"]) for s in real if s["defect_type"] == t][:per_row]
        if real_t:
            rows.append((f"{t}: real", real_t))
    grid = save_pair_grid(rows, out_dir / "grid.png", cell_px=cell_px)
    figure = save_mask_figure(comparison, out_dir / "masks.png")
    pictures = [str(grid)] + ([str(figure)] if figure else [])
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown_report(report, pictures))


def _concat(dicts: list[dict]) -> dict | None:
    if not dicts:
        return None
    return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}
