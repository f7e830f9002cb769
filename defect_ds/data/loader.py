"""Streaming loader: shards -> one rank's sample stream -> one worker's batches -> joint transforms.

Everything about an epoch is a function of (manifest, config, seed, epoch, rank), so every rank
knows, without talking to the others, how many batches each rank yields (`batches_per_epoch`), and a
resumed epoch (`skip_batches=k`) yields exactly batches k, k+1, ... of an uninterrupted one:

1. A seeded shard order per epoch. Split by shard (rank r reads shards r, r+W, ...) when there are
   enough shards and that loses little; otherwise every rank reads all shards and keeps every W-th
   sample, all repeats of a sample on one rank (split by sample). Either way ranks see disjoint samples.
2. Rare defect types repeat (balance=repeat); a seeded shuffle buffer per (seed, epoch, rank).
3. The stream is cut to the same sample count on every rank (the minimum any rank can have, read
   from the manifest) and, if a corrupt shard made it short, padded by repeating earlier samples.
4. Batch b of the rank goes to worker (b - skip) % num_workers, so the DataLoader's round-robin
   returns batches in order whatever the worker count; skipped batches are never decoded.
5. Decode, checks, joint torchvision v2 transforms; flips, crops and the draw from a latent sample's
   VAE posterior come from a hash of (seed, epoch, key, copy), not from a global RNG. A bad sample is
   replaced by a good one of the same batch (data.bad_sample_policy=warn, counted) or raises naming it
   (fail): batches stay full.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import default_collate

from defect_ds.config import DataConfig
from defect_ds.data.latents import transform_latent_sample
from defect_ds.data.reader import shard_paths
from defect_ds.data.sample import BadSampleError
from defect_ds.data.shards import read_manifest
from defect_ds.data.transforms import transform_image_sample

log = logging.getLogger("defect_ds.data")
POOL_FOR_PADDING = 256  # recent raw samples kept to pad a short rank stream
SHARD_SPLIT_MAX_LOSS = 0.1  # auto splits by shard only if that drops at most this share of samples


class BadShardError(RuntimeError):
    """A shard that cannot be read, under data.bad_sample_policy=fail."""

    def __str__(self) -> str:  # webdataset appends its stream and url to the args of errors it passes on
        return str(self.args[0]) if self.args else ""


@dataclass
class EpochPlan:
    shard_paths: list[Path]  # the split's shards in manifest order
    shard_samples: list[int]  # samples per shard, as the manifest lists them
    shard_sizes: list[int]  # samples per shard after repeats
    repeat: dict[str, int]  # defect type -> copies per epoch
    split_by: str  # "shard" or "sample"
    samples_per_rank: int
    kind: str  # "images" or "latents"


def _hash_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def repeat_factors(counts: dict[str, int], max_repeat: int) -> dict[str, int]:
    """Copies per epoch of each defect type so every type appears about as often as the most common one."""
    top = max(counts.values(), default=0)
    return {t: min(max_repeat, max(1, round(top / n))) for t, n in counts.items() if n > 0}


def plan_epoch(cfg: DataConfig, world_size: int) -> EpochPlan:
    manifest = read_manifest(cfg.train_shards)
    shards = manifest["shards"].get(cfg.split, [])
    if not shards:
        raise ValueError(f"{cfg.train_shards} has no {cfg.split} shards; set data.split to a split the manifest "
                         "lists or re-run `defect-ds prepare`.")
    paths = [path for _, path in shard_paths(Path(cfg.train_shards), manifest, (cfg.split,))]
    counts = manifest["counts"].get(cfg.split, {})
    repeat = repeat_factors(counts, cfg.max_repeat) if cfg.balance == "repeat" else {t: 1 for t in counts}
    sizes = [sum(n * repeat.get(t, 1) for t, n in s.get("counts", {}).items()) if s.get("counts") else s["samples"]
             for s in shards]
    total = sum(sizes)
    per_shard_rank = len(sizes) // world_size
    shard_cap = sum(sorted(sizes)[:per_shard_rank])  # the fewest samples any rank can get from its shards
    split_by = cfg.split_by
    if split_by == "shard" and per_shard_rank == 0:
        raise ValueError(f"data.split_by=shard needs at least {world_size} {cfg.split} shards in "
                         f"{cfg.train_shards} (there are {len(sizes)}); use split_by=sample or write smaller shards.")
    if split_by == "auto":
        ok = per_shard_rank > 0 and shard_cap * world_size >= (1 - SHARD_SPLIT_MAX_LOSS) * total
        split_by = "shard" if ok else "sample"
    # by sample, all copies of a sample stay on one rank, so ranks can differ by up to the largest repeat
    # factor r; the fewest any rank gets is then ceil((total - (W - 1) r) / W), which is the line below
    spread = (world_size - 1) * (max(repeat.values(), default=1) - 1)
    per_rank = shard_cap if split_by == "shard" else (total - spread) // world_size
    return EpochPlan(paths, [s["samples"] for s in shards], sizes, repeat, split_by, per_rank,
                     manifest.get("kind", "images"))


def batches_per_epoch(cfg: DataConfig, *, micro_batch_size: int, world_size: int) -> int:
    """Full batches every rank yields per epoch; the same on every rank, from the manifest alone."""
    return plan_epoch(cfg, world_size).samples_per_rank // micro_batch_size


# ---- the per-rank raw stream (bytes only; identical in every worker of a rank) ----------------------
def _tar_handler(policy: str) -> Callable[[Exception], bool]:
    def handle(exn: Exception) -> bool:
        if isinstance(exn, BadShardError):  # ours, handed up to the handler of an outer reading level
            raise exn
        if policy == "fail":
            # webdataset appends (stream, url) to the args of the error it hands over
            url = next((a for a in exn.args[1:] if isinstance(a, str)), None)
            reason = exn.args[0] if exn.args else exn
            raise BadShardError(f"Cannot read {'shard ' + url if url else 'a shard'} ({reason}); re-run "
                                "`defect-ds prepare` or set data.bad_sample_policy=warn to skip what is "
                                "unreadable.") from exn
        if _worker_id() == 0:  # every worker reads the same bytes; one of them reports it
            log.warning("skipping the unreadable rest of a shard (%s); the rank is padded to full length", exn)
        return True
    return handle


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _check_shard_counts(samples: Iterator[dict], urls: list[str], expected: list[int], policy: str
                        ) -> Iterator[dict]:
    """Compares each of this rank's shards, in reading order, with its sample count in the manifest: a
    truncated tar can end without an error. A shard is checked once it has been read to its end (the
    next shard starts, or the stream ends), so a stream cut short after a rank has its samples never
    makes the shard it stopped in look short."""
    position = {url: i for i, url in enumerate(urls)}
    counts = [0] * len(urls)
    checked = 0  # shards before this index are read to their end and checked
    for sample in samples:
        i = position.get(sample.get("__url__"))
        if i is not None:
            while checked < i:
                _check_shard_count(urls[checked], counts[checked], expected[checked], policy)
                checked += 1
            counts[i] += 1
        yield sample
    for i in range(checked, len(urls)):
        _check_shard_count(urls[i], counts[i], expected[i], policy)


def _check_shard_count(url: str, n: int, want: int, policy: str) -> None:
    if n >= want:
        return
    if policy == "fail":
        raise BadShardError(f"Shard {url} holds {n} readable samples but the manifest lists {want}; re-run "
                            "`defect-ds prepare`, or set data.bad_sample_policy=warn to skip what is unreadable.")
    if _worker_id() == 0:  # every worker reads the same bytes; one of them reports it
        log.warning("shard %s holds %d readable samples of %d listed in the manifest", url, n, want)


def _repeat_and_split(samples: Iterator[dict], repeat: dict[str, int], rank: int, world_size: int,
                      by_sample: bool) -> Iterator[dict]:
    """Expands repeats (copy r of a sample gets `__copy__` = r) and keeps this rank's share by sample.

    By sample, each sample goes with all its copies to the rank with the fewest copies so far (the
    lowest rank on a tie): every rank sees the same stream, so all ranks agree on the assignment without
    talking, and no two ranks hold copies of the same sample. Without repeats this is plain round-robin;
    with them, ranks differ by at most the largest repeat factor (see `plan_epoch`).
    """
    loads = [0] * world_size
    for sample in samples:
        defect_type = _defect_type(sample)
        copies = repeat.get(defect_type, 1)
        owner = loads.index(min(loads))
        loads[owner] += copies
        if not by_sample or owner == rank:
            for r in range(copies):
                yield dict(sample, __copy__=str(r), __defect_type__=defect_type)


def _defect_type(sample: dict) -> str:
    try:
        return str(json.loads(sample["json"])["defect_type"])
    except Exception:  # an unreadable record is reported when the sample is decoded
        return "?"


def _cap_and_pad(samples: Iterator[dict], count: int, rank: int) -> Iterator[dict]:
    """Exactly `count` samples: the first ones, then (if the stream ran short) earlier ones again."""
    pool: list[dict] = []
    n = 0
    for sample in samples:
        if n == count:
            return
        yield sample
        n += 1
        pool.append(sample)
        if len(pool) > POOL_FOR_PADDING:
            pool.pop(0)
    if n < count:
        if not pool:
            raise BadShardError(f"Rank {rank} read no sample at all from its shards; check that they are "
                                "readable tar files or re-run `defect-ds prepare`.")
        if _worker_id() == 0:
            log.warning("rank %d: %d of %d samples are missing (unreadable shard?); repeating earlier samples "
                        "so every rank yields the same number of batches", rank, count - n, count)
        for p in range(count - n):
            source = pool[p % len(pool)]
            yield dict(source, __copy__=f"{source['__copy__']}.pad{p}", __padded__=True)


def _select_batches(samples: Iterator[dict], batch_size: int, num_batches: int, skip: int,
                    num_workers: int) -> Iterator[dict]:
    """This worker's whole batches among batches skip .. num_batches-1, cut before any decoding."""
    worker = _worker_id()
    for i, sample in enumerate(samples):
        b = i // batch_size
        if b >= num_batches:
            return
        if b >= skip and (b - skip) % num_workers == worker:
            yield sample


# ---- decode and transform (per sample, in the workers) ----------------------------------------------
def augment_decisions(seed: int, epoch: int, key: str, copy: str) -> tuple[bool, bool, float, float]:
    """(hflip, vflip, crop y in [0,1), crop x in [0,1)) for one copy of one sample in one epoch."""
    h = _hash_int(seed, epoch, key, copy)
    return bool(h & 1), bool(h >> 1 & 1), (h >> 8 & 0xFFFF) / 65536, (h >> 24 & 0xFFFF) / 65536


def posterior_generator(seed: int, epoch: int, key: str, copy: str) -> torch.Generator:
    """The generator of one copy of one latent sample's VAE posterior draw in one epoch: seeded from a hash,
    like `augment_decisions`, so the draw does not depend on the worker count, the batch position or
    what the trainer did to torch's global RNG (a resumed run draws exactly what the straight one drew)."""
    return torch.Generator().manual_seed(_hash_int(seed, epoch, key, copy, "posterior"))


@dataclass
class _Bad:
    key: str
    reason: str
    padded: bool


class _SampleTransform:
    """raw bytes -> tensors; a bad sample becomes a `_Bad` marker (warn) or an error naming it (fail)."""

    def __init__(self, cfg: DataConfig, seed: int, epoch: int, kind: str):
        self.cfg, self.seed, self.epoch, self.kind = cfg, seed, epoch, kind

    def __call__(self, raw: dict) -> dict | _Bad:
        key = raw.get("__key__", "?")
        try:
            hflip, vflip, cy, cx = augment_decisions(self.seed, self.epoch, key, raw["__copy__"])
            hflip, vflip = hflip and self.cfg.hflip, vflip and self.cfg.vflip
            if self.kind == "latents":  # the posterior draw, too, is a function of the sample, not of a global RNG
                out = transform_latent_sample(raw, self.cfg, hflip, posterior_generator(self.seed, self.epoch, key,
                                                                                        raw["__copy__"]))
            else:
                out = transform_image_sample(raw, self.cfg, hflip, vflip, (cy, cx) if self.cfg.random_crop else None)
        except Exception as e:
            reason = str(e) if isinstance(e, BadSampleError) else f"{type(e).__name__}: {e}"
            if self.cfg.bad_sample_policy == "fail":
                raise BadSampleError(f"Sample {key!r} of {raw.get('__url__')} is unusable ({reason}); fix or "
                                     "re-prepare the data, or set data.bad_sample_policy=warn to skip it.") from e
            return _Bad(key, reason, bool(raw.get("__padded__")))
        out["key"] = key
        out["__padded__"] = bool(raw.get("__padded__"))
        return out


class _Collate:
    """Stacks tensors, lists the rest; bad samples are replaced by good ones of the same batch."""

    def __init__(self) -> None:
        self.last_good: dict | None = None  # for the rare batch with no good sample at all

    def __call__(self, items: list) -> dict[str, Any]:
        good = [x for x in items if not isinstance(x, _Bad)]
        bad = [x for x in items if isinstance(x, _Bad)]
        for x in bad:
            log.warning("skipping bad sample %s (%s); a good sample of the same batch takes its place",
                        x.key, x.reason)
        if not good:
            if self.last_good is None:
                raise BadSampleError(f"Every sample of a batch is unusable (first: {bad[0].key}: {bad[0].reason}); "
                                     "fix or re-prepare the data.")
            good = [self.last_good]
        self.last_good = good[-1]
        filled = [x if not isinstance(x, _Bad) else good[i % len(good)] for i, x in enumerate(items)]
        batch: dict[str, Any] = {}
        for name in filled[0]:
            if name.startswith("__"):  # __padded__, and __key__ that wds.map copies over
                continue
            values = [x[name] for x in filled]
            # default_collate stacks straight into shared memory inside a worker: no extra copy to send it
            batch[name] = default_collate(values) if isinstance(values[0], torch.Tensor) else values
        batch["num_replaced"] = len(bad)
        batch["num_padded"] = sum(1 for x in items if (x.padded if isinstance(x, _Bad) else x["__padded__"]))
        return batch


class EpochLoader:
    """One epoch of one rank: iterate for its batches; `len()` is the batches left after the skip.

    After (or during) iteration, `num_replaced` counts bad samples replaced and `num_padded` samples
    repeated to make up for unreadable shards, on this rank.
    """

    def __init__(self, dataset: wds.DataPipeline, num_batches: int, num_workers: int):
        self.dataset, self.num_batches, self.num_workers = dataset, num_batches, num_workers
        self.num_replaced = 0
        self.num_padded = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            source = iter(self.dataset)
        else:
            source = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                      pin_memory=torch.cuda.is_available()))
        yielded = 0
        for batch in source:
            self.num_replaced += batch.pop("num_replaced")
            self.num_padded += batch.pop("num_padded")
            yielded += 1
            yield batch
        if yielded != self.num_batches:  # would let ranks drift apart; the design rules it out
            raise RuntimeError(f"The loader yielded {yielded} batches instead of {self.num_batches}.")


def build_loader(cfg: DataConfig, *, micro_batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 skip_batches: int = 0) -> EpochLoader:
    """Batches k = skip_batches .. batches_per_epoch-1 of this rank's epoch, as dicts: pixel_values
    (B,3,R,R) float32 in [-1,1] (or latents), mask (B,1,R,R) float32 0/1, caption, defect_type, key."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid for world_size={world_size}.")
    plan = plan_epoch(cfg, world_size)
    num_batches = plan.samples_per_rank // micro_batch_size
    if not 0 <= skip_batches <= num_batches:
        raise ValueError(f"skip_batches={skip_batches} is invalid: the epoch has {num_batches} batches per rank.")
    order = list(range(len(plan.shard_paths)))
    random.Random(_hash_int(seed, epoch, "shards")).shuffle(order)
    if plan.split_by == "shard":
        order = order[rank::world_size]
    urls = [str(plan.shard_paths[i]) for i in order]
    workers = max(1, cfg.num_workers)
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=_tar_handler(cfg.bad_sample_policy)),
        partial(_check_shard_counts, urls=urls, expected=[plan.shard_samples[i] for i in order],
                policy=cfg.bad_sample_policy),
        partial(_repeat_and_split, repeat=plan.repeat, rank=rank, world_size=world_size,
                by_sample=plan.split_by == "sample"),
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, seed=_hash_int(seed, epoch, rank, "shuffle")),
        partial(_cap_and_pad, count=plan.samples_per_rank, rank=rank),
        partial(_select_batches, batch_size=micro_batch_size, num_batches=num_batches, skip=skip_batches,
                num_workers=workers),
        wds.map(_SampleTransform(cfg, seed, epoch, plan.kind)),
        wds.batched(micro_batch_size, collation_fn=_Collate(), partial=False),
    )
    return EpochLoader(dataset, num_batches - skip_batches, cfg.num_workers)
