"""The streaming loader: batch format, joint transforms, determinism, resume, ranks, workers, balance,
bad samples and shards, latent shards. All data is made here, tiny."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_ds.config import DataConfig
from defect_ds.data import loader
from defect_ds.data.loader import BadShardError, batches_per_epoch, build_loader, plan_epoch
from defect_ds.data.prepare import WriteOptions, synthetic_jobs, write_dataset
from defect_ds.data.sample import BadSampleError, Sample
from defect_ds.data.shards import ShardWriter, build_manifest, write_manifest

TOKENS = {"crack": "sks_crack", "scratch": "sks_scratch", "spot": "sks_spot"}


def synthetic_shards(out: Path, *, per_defect=3, good=3, max_per_shard=1000, size=32) -> Path:
    jobs = synthetic_jobs(resolution_px=size, per_defect=per_defect, good_per_category=good, seed=0, tokens=TOKENS,
                          templates={}, categories=("pill", "screw", "surface"))
    write_dataset(jobs, out, WriteOptions(val_fraction=0.0, max_samples_per_shard=max_per_shard, progress=False),
                  defect_tokens=TOKENS)
    return out


def l_shaped_sample(i: int, width=48, height=32, defect_type="scratch", scale=1) -> Sample:
    """Red exactly where the mask is: an L in the left half, so flips and crops are visible."""
    mask = np.zeros((height, width), np.uint8)
    mask[4 * scale:8 * scale, 6 * scale:20 * scale] = 255
    mask[4 * scale:28 * scale, 6 * scale:10 * scale] = 255
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = mask
    image[..., 1] = 40 + i  # makes samples distinguishable
    return Sample(f"s-{i:03d}", Image.fromarray(image), Image.fromarray(mask), f"a photo with {TOKENS['scratch']}",
                  {"defect_type": defect_type, "category": "test", "split": "train"})


def write_samples(out: Path, encoded: list[tuple[dict, str]], max_per_shard: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_samples=max_per_shard)
    for sample, defect_type in encoded:
        writer.write("train", sample, defect_type)
    write_manifest(out, build_manifest(writer.close(), defect_tokens=TOKENS))
    return out


def collect(cfg, **kw):
    loader = build_loader(cfg, **kw)
    return loader, list(loader)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("synth"))  # 3 categories x 4 types x 3 = 36 samples


def test_batch_format(synth):
    cfg = DataConfig(train_shards=str(synth), resolution_px=32, vflip=True)
    loader, batches = collect(cfg, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0)
    assert len(batches) == len(loader) == 9 == batches_per_epoch(cfg, micro_batch_size=4, world_size=1)
    b = batches[0]
    assert set(b) == {"pixel_values", "mask", "caption", "defect_type", "key"}
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["mask"].shape == (4, 1, 32, 32) and b["mask"].dtype == torch.float32
    pixels = torch.cat([x["pixel_values"] for x in batches])
    masks = torch.cat([x["mask"] for x in batches])
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.5 and pixels.max() > 0.5
    types_ = [t for x in batches for t in x["defect_type"]]
    for caption, defect_type in zip([c for x in batches for c in x["caption"]], types_):
        assert (TOKENS.get(defect_type, "") in caption) and (defect_type != "good" or "sks_" not in caption)
    good = torch.tensor([t == "good" for t in types_])
    assert masks[good].sum() == 0 and (masks[~good].flatten(1).sum(1) > 0).all()
    assert len({k for x in batches for k in x["key"]}) == 36


def test_mask_stays_aligned_through_crop_and_flips(tmp_path):
    shards = write_samples(tmp_path, [(l_shaped_sample(i).encode(), "scratch") for i in range(16)], 100)
    cfg = DataConfig(train_shards=str(shards), resolution_px=32, random_crop=True, hflip=True, vflip=True)
    _, batches = collect(cfg, micro_batch_size=4, rank=0, world_size=1, seed=3, epoch=0)
    pixels = torch.cat([b["pixel_values"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches])
    assert torch.equal((pixels[:, 0] > 0).float(), masks[:, 0])  # red is exactly where the mask is
    # the L's corner moved: some samples flipped, some cropped differently
    corners = {(int(m[0].nonzero()[:, 0].float().mean() > 16), int(m[0].nonzero()[:, 1].float().mean() > 16),
                int(m[0].nonzero()[:, 1].min())) for m in masks}
    assert len({c[:2] for c in corners}) >= 3 and len({c[2] for c in corners}) >= 3


def test_resized_mask_stays_binary_and_aligned(tmp_path):
    shards = write_samples(tmp_path, [(l_shaped_sample(i, width=80, height=64, scale=2).encode(), "scratch")
                                      for i in range(4)], 100)
    cfg = DataConfig(train_shards=str(shards), resolution_px=24, random_crop=True)
    _, batches = collect(cfg, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0)
    pixels, masks = batches[0]["pixel_values"], batches[0]["mask"]
    assert pixels.shape == (4, 3, 24, 24) and masks.shape == (4, 1, 24, 24)
    assert set(masks.unique().tolist()) == {0.0, 1.0}  # nearest: never a blend, never normalised
    red = pixels[:, 0] > 0
    iou = (red & (masks[:, 0] > 0)).sum() / (red | (masks[:, 0] > 0)).sum()
    assert iou > 0.8  # the image is resized with antialiasing, the mask nearest: edges may differ by a pixel


def test_no_flips_when_off(tmp_path):
    shards = write_samples(tmp_path, [(l_shaped_sample(i, width=32).encode(), "scratch") for i in range(8)], 100)
    cfg = DataConfig(train_shards=str(shards), resolution_px=32, hflip=False, vflip=False)
    _, batches = collect(cfg, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0)
    expected = torch.from_numpy(np.asarray(l_shaped_sample(0, width=32).mask) > 0).float()
    assert all(torch.equal(m[0], expected) for b in batches for m in b["mask"])


def test_same_arguments_same_batches_and_epochs_differ(synth):
    cfg = DataConfig(train_shards=str(synth), resolution_px=16, random_crop=True)
    kw = dict(micro_batch_size=4, rank=0, world_size=1, seed=1)
    _, a = collect(cfg, epoch=0, **kw)
    _, b = collect(cfg, epoch=0, **kw)
    _, c = collect(cfg, epoch=1, **kw)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_skip_batches_matches_uninterrupted(synth, num_workers):
    cfg = DataConfig(train_shards=str(synth), resolution_px=16, random_crop=True, vflip=True, num_workers=num_workers)
    kw = dict(micro_batch_size=3, rank=1, world_size=2, seed=5, epoch=2)
    _, full = collect(DataConfig(**{**cfg.__dict__, "num_workers": 0}), **kw)
    loader, resumed = collect(cfg, skip_batches=4, **kw)
    assert len(full) == 6 and len(resumed) == len(loader) == 2
    for x, y in zip(full[4:], resumed):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["mask"], y["mask"])


def test_workers_give_the_same_batches_as_the_main_process(synth):
    kw = dict(micro_batch_size=2, rank=0, world_size=1, seed=0, epoch=0)
    _, single = collect(DataConfig(train_shards=str(synth), resolution_px=16), **kw)
    _, multi = collect(DataConfig(train_shards=str(synth), resolution_px=16, num_workers=2), **kw)
    assert [b["key"] for b in single] == [b["key"] for b in multi]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(single, multi))


@pytest.mark.parametrize("split_by", ["shard", "sample", "auto"])
def test_two_ranks_disjoint_and_equal_with_uneven_shards(tmp_path, split_by):
    # 36 samples in shards of 10, 10, 10, 6: three shards do not divide over two ranks
    shards = synthetic_shards(tmp_path, max_per_shard=10)
    cfg = DataConfig(train_shards=str(shards), resolution_px=16, split_by=split_by)
    assert len(list(shards.glob("train-*.tar"))) == 4
    per_rank = batches_per_epoch(cfg, micro_batch_size=2, world_size=2)
    for epoch in range(3):
        keys = []
        for rank in range(2):
            _, batches = collect(cfg, micro_batch_size=2, rank=rank, world_size=2, seed=0, epoch=epoch)
            assert len(batches) == per_rank
            keys.append([k for b in batches for k in b["key"]])
        assert not set(keys[0]) & set(keys[1])
        assert len(set(keys[0])) == len(keys[0])  # no sample twice within a rank
    expected = {"shard": 8, "sample": 9, "auto": 9}[split_by]  # shard: min over ranks of 10+6 samples
    assert per_rank == expected


def keep_first_samples(shard: Path, samples: int) -> None:
    """Rewrites a shard as a valid tar holding only its first samples: short, but no read error."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:samples * 4]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


def _run_ranks(cfg, world_size=2) -> dict[int, str]:
    """Each rank's whole epoch; rank -> the BadShardError it raised, or "" when it yielded every batch."""
    outcome = {}
    for rank in range(world_size):
        try:
            _, batches = collect(cfg, micro_batch_size=2, rank=rank, world_size=world_size, seed=0, epoch=0)
        except BadShardError as e:
            outcome[rank] = str(e)
        else:
            assert len(batches) == batches_per_epoch(cfg, micro_batch_size=2, world_size=world_size)
            outcome[rank] = ""
    return outcome


@pytest.mark.parametrize("shuffle_buffer", [256, 3])  # 3: a rank stops before it has read all its shards
def test_shard_counts_are_checked_against_this_ranks_shards_only(tmp_path, caplog, shuffle_buffer):
    shards = synthetic_shards(tmp_path, max_per_shard=10)  # 10, 10, 10, 6
    for policy in ("fail", "warn"):
        cfg = DataConfig(train_shards=str(shards), resolution_px=16, split_by="shard", bad_sample_policy=policy,
                         shuffle_buffer=shuffle_buffer)
        assert _run_ranks(cfg) == {0: "", 1: ""}
    assert "readable samples" not in caplog.text
    victim = shards / "train-000001.tar"
    keep_first_samples(victim, 5)
    cfg = DataConfig(train_shards=str(shards), resolution_px=16, split_by="shard", bad_sample_policy="fail")
    errors = [e for e in _run_ranks(cfg).values() if e]
    assert len(errors) == 1 and f"Shard {victim} holds 5 readable samples but the manifest lists 10" in errors[0]
    caplog.clear()
    _run_ranks(DataConfig(**{**cfg.__dict__, "bad_sample_policy": "warn"}))
    short = [r.getMessage() for r in caplog.records if "readable samples" in r.getMessage()]
    assert short == [f"shard {victim} holds 5 readable samples of 10 listed in the manifest"]


def test_split_by_shard_needs_enough_shards(synth):
    cfg = DataConfig(train_shards=str(synth), split_by="shard")
    with pytest.raises(ValueError, match="split_by=shard needs at least 2"):
        batches_per_epoch(cfg, micro_batch_size=1, world_size=2)


def test_balance_repeats_rare_defect_types(tmp_path):
    samples = [(l_shaped_sample(i, width=32, defect_type="scratch").encode(), "scratch") for i in range(12)]
    samples += [(l_shaped_sample(100 + i, width=32, defect_type="crack").encode(), "crack") for i in range(3)]
    shards = write_samples(tmp_path, samples, 100)
    plain = DataConfig(train_shards=str(shards), resolution_px=32)
    balanced = DataConfig(train_shards=str(shards), resolution_px=32, balance="repeat", max_repeat=8)
    _, a = collect(plain, micro_batch_size=3, rank=0, world_size=1, seed=0, epoch=0)
    loader, b = collect(balanced, micro_batch_size=3, rank=0, world_size=1, seed=0, epoch=0)
    count_a = Counter(t for x in a for t in x["defect_type"])
    count_b = Counter(t for x in b for t in x["defect_type"])
    assert count_a == {"scratch": 12, "crack": 3}
    assert count_b == {"scratch": 12, "crack": 12} and len(loader) == 8
    # repeated copies are augmented independently
    crack_masks = [m for x in b for m, t in zip(x["mask"], x["defect_type"]) if t == "crack"]
    assert len({tuple(m[0].sum(0).tolist()) for m in crack_masks}) == 2  # both flip states occur
    capped = DataConfig(train_shards=str(shards), balance="repeat", max_repeat=2)
    assert plan_epoch(capped, 1).repeat == {"crack": 2, "scratch": 1}


def test_balance_keeps_all_copies_of_a_sample_on_one_rank(tmp_path):
    samples = [(l_shaped_sample(i, width=32, defect_type="scratch").encode(), "scratch") for i in range(12)]
    samples += [(l_shaped_sample(100 + i, width=32, defect_type="crack").encode(), "crack") for i in range(3)]
    shards = write_samples(tmp_path, samples, 100)
    cfg = DataConfig(train_shards=str(shards), resolution_px=32, balance="repeat", split_by="sample")
    per_rank = batches_per_epoch(cfg, micro_batch_size=2, world_size=2)
    assert per_rank == 5  # 12 + 3 x 4 copies; ranks may differ by one sample's 4 copies: (24 - 3) // 2 = 10
    keys = []
    for rank in range(2):
        loader, batches = collect(cfg, micro_batch_size=2, rank=rank, world_size=2, seed=0, epoch=0)
        assert len(batches) == per_rank and loader.num_padded == 0
        keys.append({k for b in batches for k in b["key"]})
    assert not keys[0] & keys[1] and any(k >= "s-100" for k in keys[0] | keys[1])


def _with_bad_samples(tmp_path, bad: dict) -> Path:
    samples = [(l_shaped_sample(i, width=32).encode(), "scratch") for i in range(11)]
    samples.insert(5, (dict(l_shaped_sample(99, width=32).encode(), **bad), "scratch"))
    return write_samples(tmp_path, samples, 100)


@pytest.mark.parametrize("bad", [
    {"image.png": b"\x89PNG\r\n\x1a\n not really"},  # corrupt PNG
    {"mask.png": Sample("x", Image.new("RGB", (8, 8)), Image.new("L", (8, 8)), "c").encode()["mask.png"]},  # size
    {"caption.txt": b"   "},  # empty caption
    {"image.png": b"%PDF-1.4 this is not an image"},  # non-image file
], ids=["corrupt-png", "mask-size", "empty-caption", "not-an-image"])
def test_bad_sample_warn_replaces_and_counts_fail_raises(tmp_path, bad, caplog):
    shards = _with_bad_samples(tmp_path, bad)
    warn = DataConfig(train_shards=str(shards), resolution_px=32, bad_sample_policy="warn")
    loader, batches = collect(warn, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0)
    assert len(batches) == 3 and all(len(b["key"]) == 4 for b in batches)
    assert loader.num_replaced == 1 and "s-099" not in [k for b in batches for k in b["key"]]
    assert "s-099" in caplog.text
    fail = DataConfig(train_shards=str(shards), resolution_px=32, bad_sample_policy="fail")
    with pytest.raises(BadSampleError, match="s-099"):
        list(build_loader(fail, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0))


def test_decompression_bomb_is_refused_at_load_time(tmp_path):
    # a real PNG whose header says 4000 x 4000: over the limit before any pixel is decoded
    big = Image.new("L", (4000, 4000))
    shards = _with_bad_samples(tmp_path, {"image.png": Sample("x", big.convert("RGB"), big, "c").encode()["image.png"]})
    cfg = DataConfig(train_shards=str(shards), resolution_px=32, max_image_pixels=1 << 20, bad_sample_policy="fail")
    with pytest.raises(BadSampleError, match="decompression bomb"):
        list(build_loader(cfg, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0))


def test_corrupt_shard_keeps_ranks_equal(tmp_path):
    shards = synthetic_shards(tmp_path, max_per_shard=9)  # 4 shards of 9
    victim = shards / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated mid-sample
    cfg = DataConfig(train_shards=str(shards), resolution_px=16, split_by="shard")
    lengths, padded = [], 0
    for rank in range(2):
        loader, batches = collect(cfg, micro_batch_size=3, rank=rank, world_size=2, seed=0, epoch=0)
        lengths.append(len(batches))
        padded += loader.num_padded + loader.num_replaced
        assert all(len(b["key"]) == 3 for b in batches)
    assert lengths == [6, 6] and padded > 0
    fail = DataConfig(train_shards=str(shards), resolution_px=16, split_by="sample", bad_sample_policy="fail")
    with pytest.raises((BadShardError, BadSampleError)):
        list(build_loader(fail, micro_batch_size=3, rank=0, world_size=2, seed=0, epoch=0))


def test_garbage_shard_and_missing_shard(tmp_path):
    shards = synthetic_shards(tmp_path, max_per_shard=9)
    (shards / "train-000001.tar").write_bytes(b"this is not a tar file at all" * 100)
    cfg = DataConfig(train_shards=str(shards), resolution_px=16)
    loader, batches = collect(cfg, micro_batch_size=2, rank=0, world_size=1, seed=0, epoch=0)
    assert len(batches) == 18 and loader.num_padded == 9
    (shards / "train-000003.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        build_loader(cfg, micro_batch_size=2, rank=0, world_size=1, seed=0, epoch=0)


def test_latent_shards_use_the_pluggable_transform(tmp_path, monkeypatch):
    shards = synthetic_shards(tmp_path / "s")
    manifest_path = shards / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"kind": "images"', '"kind": "latents"'))
    seen = []

    def transform_latent_sample(sample, cfg, flip, generator=None):
        seen.append(flip)
        assert isinstance(generator, torch.Generator)  # the posterior draw never falls back on global randomness
        return {"latents": torch.full((4, 2, 2), float(flip)), "mask": torch.zeros(1, 2, 2),
                "caption": sample["caption.txt"].decode(), "defect_type": "x"}

    monkeypatch.setattr(loader, "transform_latent_sample", transform_latent_sample)
    cfg = DataConfig(train_shards=str(shards), resolution_px=16)
    _, batches = collect(cfg, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0)
    assert batches[0]["latents"].shape == (4, 4, 2, 2) and "pixel_values" not in batches[0]
    assert len(seen) == 36 and 0 < sum(seen) < 36
