"""The file logic of engine checkpoints: the commit marker, retention, the latest committed tag.

No DeepSpeed process: a fake engine writes what `engine.save_checkpoint` would, and the barrier is a no-op.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defect_ds.config import ConfigError
from defect_ds.train import checkpoint as ckpt


def _saved(ckpt_dir: Path, step: int, committed: bool) -> Path:
    folder = ckpt_dir / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if committed:
        ckpt.commit(ckpt_dir, step)
    return folder


class FakeEngine:
    def __init__(self):
        self.saved: list[tuple[str, dict]] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool,
                        exclude_frozen_parameters: bool) -> None:
        assert not save_latest  # the commit marker, not DeepSpeed's `latest` file, says what is complete
        assert exclude_frozen_parameters  # lean: the frozen base comes from model.pretrained_dir
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        self.saved.append((tag, client_state))


@pytest.fixture
def no_barrier(monkeypatch):
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)


def test_tags_sort_by_step():
    tags = [ckpt.tag_for(s) for s in (9, 10, 100, 1_000_000)]
    assert tags == sorted(tags) and tags[0] == "step-0000009"


def test_commit_writes_the_marker_with_the_step(tmp_path):
    _saved(tmp_path, 7, committed=False)
    assert ckpt.committed_checkpoints(tmp_path) == []
    ckpt.commit(tmp_path, 7)
    assert (tmp_path / "step-0000007" / ckpt.COMMIT_MARKER).read_text() == "7\n"
    assert ckpt.committed_checkpoints(tmp_path) == [tmp_path / "step-0000007"]


def test_latest_is_the_newest_committed_checkpoint_never_an_interrupted_one(tmp_path):
    assert ckpt.find_resume_tag(tmp_path, "latest") is None  # nothing yet: start fresh
    _saved(tmp_path, 2, committed=True)
    _saved(tmp_path, 4, committed=True)
    _saved(tmp_path, 6, committed=False)  # a save that was cut off
    assert ckpt.find_resume_tag(tmp_path, "latest") == "step-0000004"
    assert ckpt.find_resume_tag(tmp_path, "") is None
    assert ckpt.find_resume_tag(tmp_path, "step-0000002") == "step-0000002"


def test_resuming_an_uncommitted_or_unknown_tag_names_the_committed_ones(tmp_path):
    _saved(tmp_path, 2, committed=True)
    _saved(tmp_path, 4, committed=False)
    for tag in ("step-0000004", "step-0000099"):
        with pytest.raises(FileNotFoundError, match=r"not a committed checkpoint.*step-0000002"):
            ckpt.find_resume_tag(tmp_path, tag)


def test_prune_keeps_the_newest_and_drops_interrupted_saves_older_than_them(tmp_path):
    for step in (1, 2, 3):
        _saved(tmp_path, step, committed=True)
    _saved(tmp_path, 0, committed=False)  # older than the newest commit: an abandoned save
    newer = _saved(tmp_path, 5, committed=False)  # newer: may still be being written by other ranks
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002", "step-0000003", "step-0000005"]
    assert newer.is_dir()


def test_prune_without_any_commit_deletes_nothing(tmp_path):
    _saved(tmp_path, 1, committed=False)
    ckpt.prune(tmp_path, keep_last=1)
    assert (tmp_path / "step-0000001").is_dir()


def test_save_checkpoint_commits_after_saving_and_keeps_the_last_n(tmp_path, no_barrier):
    engine = FakeEngine()
    for step in (10, 20, 30):
        path = ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, keep_last=2, is_main=True)
        assert path == tmp_path / ckpt.tag_for(step) and (path / ckpt.COMMIT_MARKER).is_file()
    assert [tag for tag, _ in engine.saved] == ["step-0000010", "step-0000020", "step-0000030"]
    assert [p.name for p in ckpt.committed_checkpoints(tmp_path)] == ["step-0000020", "step-0000030"]
    assert ckpt.find_resume_tag(tmp_path, "latest") == "step-0000030"


def test_only_rank0_commits_and_prunes(tmp_path, no_barrier):
    _saved(tmp_path, 1, committed=True)
    ckpt.save_checkpoint(FakeEngine(), tmp_path, 2, {}, keep_last=1, is_main=False)
    assert not (tmp_path / "step-0000002" / ckpt.COMMIT_MARKER).exists()
    assert [p.name for p in ckpt.committed_checkpoints(tmp_path)] == ["step-0000001"]


def test_rng_state_round_trips():
    state = ckpt.rng_state()
    expected = torch.rand(3)
    torch.rand(5)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_save_checkpoint_writes_meta_with_size_time_and_base(tmp_path, no_barrier):
    state = {"step": 3, "base_fingerprint": "abc", "trained_parameters": ["unet.a", "unet.b"]}
    path = ckpt.save_checkpoint(FakeEngine(), tmp_path, 3, state, keep_last=1, is_main=True)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    assert meta["step"] == 3 and meta["base_fingerprint"] == "abc" and meta["trained_parameters"] == 2
    assert meta["bytes"] == len(b"weights") and meta["save_s"] >= 0


def _model_folder(root: Path, weights: bytes) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return root


def test_base_fingerprint_changes_with_any_weight_chunk_and_not_with_the_folder_path(tmp_path):
    weights = bytes(range(256)) * 4096  # 1 MiB: read in chunks
    a = ckpt.base_fingerprint(_model_folder(tmp_path / "a", weights))
    assert a == ckpt.base_fingerprint(_model_folder(tmp_path / "copy", weights))
    changed = bytearray(weights)
    changed[-1] ^= 1  # the last byte: the final chunk covers it
    assert a != ckpt.base_fingerprint(_model_folder(tmp_path / "b", bytes(changed)))


def test_resume_refuses_another_base_or_other_trained_parameters(tmp_path):
    state = {"base_fingerprint": "abc", "trained_parameters": ["unet.lora_A", "unet.lora_B"]}
    ckpt.check_same_base(state, tmp_path, "abc", ["unet.lora_A", "unet.lora_B"])  # same: no error
    with pytest.raises(ConfigError, match="model.pretrained_dir"):
        ckpt.check_same_base(state, tmp_path, "other", ["unet.lora_A", "unet.lora_B"])
    with pytest.raises(ConfigError, match=r"missing \['unet.tok'\]"):
        ckpt.check_same_base(state, tmp_path, "abc", ["unet.lora_A", "unet.lora_B", "unet.tok"])
