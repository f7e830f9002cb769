"""Trains and scores one segmenter (or classifier, `task="classify"`) per (arm, seed), in worker processes.

    python -c "from defect_ds.downstream.runner import default_workers; print(default_workers())"

The segmenter is small: on a CPU its convolutions do not keep two threads busy, so two processes of one
thread each train two (arm, seed) pairs at once in about the time one process of two threads takes for
one (docs/downstream.md, The segmenter). Every segmenter trains on one thread, in a worker or not: the
order of a convolution's sums depends on the thread count, and with it the last bits of the result.
Workers are spawned (not forked, which is unsafe once torch's thread pool has started) and receive the
data once. A job's result does not depend on which worker ran it or how many there were: a segmenter
is a function of its arm's data and its seed.

With `cache_dir`, each finished job's outcome is kept in a file named by a fingerprint of its arm's data
and the settings, so an interrupted evaluation resumes where it stopped, a changed one starts afresh,
and one with other arms reuses the segmenters of the arms it shares.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from defect_ds.data.sample import GOOD
from defect_ds.downstream.arms import ArmSampler, Pairs
from defect_ds.downstream.compare import Evidence, evidence, image_evidence
from defect_ds.downstream.scores import score_by_type
from defect_ds.downstream.segmenter import DEFAULT_LOSS
from defect_ds.utils.files import atomic_write_bytes


@dataclass(frozen=True)
class SegmenterSettings:
    steps: int
    batch_size: int
    width: int
    loss: str = DEFAULT_LOSS
    learning_rate: float = 2e-3
    ema_decay: float = 0.0
    task: str = "segment"  # or "classify": a DefectClassifier scored on image labels
    flips: bool = False  # score the mean over the test image's flips (`predict(flips=True)`)
    members: int = 1  # segmenters per seed, their probabilities averaged (member m > 0 trains from seed + 10000 m)
    colour: float = 0.0  # strength of the per-sample colour jitter in training (`colour_jitter_batch`); 0: none


@dataclass
class ArmData:
    """Everything the segmenters of one evaluation see: training sources per arm and the test set."""
    shots: Pairs
    goods: np.ndarray
    generated: dict[str, Pairs]  # arm (or "arm@label") -> generated pairs, for the arms that use them
    test: Pairs
    pool: Pairs | None = None  # the split's training-side defect images that are not shots, for all-real


@dataclass
class Outcome:
    arm: str
    seed: int
    scores: dict[str, dict[str, float]]
    evidence: Evidence
    grid: np.ndarray | None  # predicted probabilities of the grid rows (seed 0 of a segmenter only)
    # with flips: the same segmenter scored on the test images alone (no flips), for a paired comparison
    unflipped: tuple[dict[str, dict[str, float]], Evidence] | None = None
    seconds: float | None = None  # training and scoring, in its worker (kept with the outcome, so a reuse keeps it)


_STATE: dict = {}


def _init(data: ArmData, settings: SegmenterSettings, grid_rows: list[int], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _STATE.update(data=data, settings=settings, grid_rows=grid_rows, samplers={})


def _run(arm: str, seed: int) -> Outcome:
    from defect_ds.downstream.segmenter import predict, train_segmenter

    started = time.perf_counter()
    data, settings = _STATE["data"], _STATE["settings"]
    sampler = _STATE["samplers"].get(arm)
    if sampler is None:
        kind = arm.split("@")[0]  # "generated@variant": the generated arm with that variant's pairs
        sampler = _STATE["samplers"][arm] = ArmSampler(kind, data.shots, data.goods, data.generated.get(arm),
                                                       data.pool)
    nets = [train_segmenter(sampler.defect_batch, sampler.good_batch, steps=settings.steps,
                            batch_size=settings.batch_size, seed=seed + MEMBER_SEED_STRIDE * member,
                            width=settings.width, loss=settings.loss, learning_rate=settings.learning_rate,
                            ema_decay=settings.ema_decay, colour=settings.colour, task=settings.task)
            for member in range(settings.members)]
    outcomes = []
    for flips in ((False, True) if settings.flips else (False,)):
        probs = np.mean([predict(net, data.test.images, flips=flips) for net in nets], axis=0)
        scores = score_by_type(probs, data.test.masks, data.test.types, task=settings.task)
        outcomes.append((scores, image_evidence(probs, np.array(data.test.types) != GOOD)
                         if settings.task == "classify" else evidence(probs, data.test.masks)))
    grid = probs[_STATE["grid_rows"]] if seed == 0 and settings.task == "segment" else None
    return Outcome(arm, seed, *outcomes[-1], grid, unflipped=outcomes[0] if settings.flips else None,
                   seconds=time.perf_counter() - started)


MEMBER_SEED_STRIDE = 10_000  # member m of seed s trains from seed s + 10000 m: member 0 is the seed's own net


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def fingerprint(data: ArmData, settings: SegmenterSettings, grid_rows: list[int], arm: str) -> str:
    """A name for what decides one arm's outcomes: the shots, good images, test set, the arm's own generated
    pairs (or pool, for all-real) and the settings. Other arms' data stay out of it, so an evaluation with
    more or fewer arms (the demo's and `make benchmark-downstream`'s) reuses the segmenters the two have in
    common. Settings added later (`task`, `flips`, `members`, `colour`) stay out of the hash at their defaults, so kept
    segmenters stay valid."""
    named_settings = dataclasses.asdict(settings)
    for name, default in (("task", "segment"), ("flips", False), ("members", 1), ("colour", 0.0)):
        if named_settings[name] == default:
            del named_settings[name]
    h = hashlib.sha256(repr((named_settings, grid_rows, arm)).encode())
    named = [("shots", data.shots), ("test", data.test)]
    if arm in data.generated:
        named.append(("generated", data.generated[arm]))
    if arm == "all-real" and data.pool is not None:
        named.append(("pool", data.pool))
    for name, pairs in named:
        h.update(name.encode())
        for part in (pairs.images, pairs.masks, "\n".join(pairs.types).encode()):
            h.update(part if isinstance(part, bytes) else memoryview(part.tobytes()))
    h.update(memoryview(data.goods.tobytes()))
    return h.hexdigest()[:16]


def _cached(cache: Path | None, fingerprints: dict[str, str], arm: str, seed: int) -> Path | None:
    return None if cache is None else cache / fingerprints[arm] / f"{arm.replace('/', '_')}-seed{seed}.pkl"


def _keep(path: Path | None, outcome: Outcome) -> None:
    """Written whole or not at all; a full disk stops the evaluation here, at its first segmenter, in one
    sentence, rather than after every segmenter has trained."""
    if path is not None:
        atomic_write_bytes(path, pickle.dumps(outcome), advice="free space and rerun; the segmenters kept "
                                                               "so far are reused")


def run_jobs(jobs: Iterable[tuple[str, int]], data: ArmData, settings: SegmenterSettings, *, workers: int,
             grid_rows: list[int], on_done: Callable[[Outcome], None], cache_dir: Path | None = None) -> int:
    """Runs every (arm, seed) job; on_done gets each outcome as it finishes (in any order). Returns how
    many outcomes came from `cache_dir` (kept by an earlier, interrupted run with the same data and settings)."""
    jobs = list(jobs)
    cache = None if cache_dir is None else Path(cache_dir)
    fingerprints = {arm: fingerprint(data, settings, grid_rows, arm) for arm, _ in jobs} if cache else {}
    for name in set(fingerprints.values()):
        (cache / name).mkdir(parents=True, exist_ok=True)
    todo, reused = [], 0
    for arm, seed in jobs:
        path = _cached(cache, fingerprints, arm, seed)
        if path is not None and path.is_file():
            on_done(pickle.loads(path.read_bytes()))
            reused += 1
        else:
            todo.append((arm, seed))
    if workers <= 1 or len(todo) <= 1:
        import torch

        threads = torch.get_num_threads()
        _init(data, settings, grid_rows, 1)  # one thread, as in a worker: the sums, and so the result, match
        try:
            for arm, seed in todo:
                outcome = _run(arm, seed)
                _keep(_cached(cache, fingerprints, arm, seed), outcome)
                on_done(outcome)
        finally:
            torch.set_num_threads(threads)
        return reused
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(data, settings, grid_rows, 1)) as pool:
        futures = [pool.submit(_run, arm, seed) for arm, seed in todo]
        try:
            for future in as_completed(futures):
                outcome = future.result()
                _keep(_cached(cache, fingerprints, outcome.arm, outcome.seed), outcome)
                on_done(outcome)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return reused
