"""What a resume may change: refused before anything is written, allowed and noted, or a world size change."""
from __future__ import annotations

from pathlib import Path

import pytest

from defect_ds.config import ConfigError, load_config
from defect_ds.train.logger import keep_until
from defect_ds.train.resume import check_resume, launch_record

MANIFEST = {"defect_tokens": {"crack": "sks_crack"}, "counts": {"train": {"crack": 3}}, "shards": {"train": ["a"]}}
WHERE = Path("run/checkpoints/step-0000004")


def _meta(*overrides, world_size=2, manifest=MANIFEST):
    return launch_record(load_config(None, list(overrides)), world_size, manifest)


def test_the_same_launch_on_another_world_size_resumes_and_says_what_it_was():
    plan = check_resume(_meta(), WHERE, load_config(None, ["--data.num_workers=4"]), 1, MANIFEST)
    assert plan.saved_world_size == 2 and plan.notes == []


def test_a_change_to_what_trains_is_one_sentence_naming_every_field():
    cfg = load_config(None, ["--lora.rank=4", "--lora.target_modules=to_q"])
    with pytest.raises(ConfigError) as refusal:
        check_resume(_meta(), WHERE, cfg, 2, MANIFEST)
    message = str(refusal.value)
    assert message.startswith(f"Checkpoint {WHERE} cannot continue with lora.rank from 8 to 4; "
                              "lora.target_modules from ['attn1.to_q'")
    assert message.endswith("start a new run in another --logging.run_dir.") and "\n" not in message
    other_tokens = {**MANIFEST, "defect_tokens": {"dent": "sks_dent"}}
    with pytest.raises(ConfigError, match=r"the defect tokens from \['sks_crack'\] to \['sks_dent'\]"):
        check_resume(_meta(), WHERE, load_config(None, ["--checkpoint.allow_data_change=true"]), 2, other_tokens)


def test_other_data_needs_allow_data_change_and_is_then_noted():
    other = {**MANIFEST, "counts": {"train": {"crack": 5}}}
    with pytest.raises(ConfigError, match=r"was trained on other data \(data.hflip from True to False; the shards "
                                          r".*pass --checkpoint.allow_data_change=true"):
        check_resume(_meta(), WHERE, load_config(None, ["--data.hflip=false"]), 2, other)
    allowed = load_config(None, ["--data.hflip=false", "--checkpoint.allow_data_change=true"])
    [note] = check_resume(_meta(), WHERE, allowed, 2, other).notes
    assert note.startswith("resuming on changed data (data.hflip from True to False; the shards")


def test_a_checkpoint_saved_before_the_record_resumes_as_before():
    assert check_resume({}, WHERE, load_config(None, ["--lora.rank=4"]), 1, MANIFEST).saved_world_size == 1


def test_metrics_after_the_resume_step_go(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3, 4)))
    keep_until(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n'
    keep_until(tmp_path / "none.jsonl", 2)  # a fresh run has none


def test_a_checkpoint_deepspeed_cannot_convert_names_the_process_count_to_resume_on(tmp_path):
    from defect_ds.train.resume import to_universal

    tag = tmp_path / "step-0000004"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as refusal:
        to_universal(tmp_path, tag.name, saved_world_size=2, world_size=1)
    message = str(refusal.value)
    assert message.startswith(f"Checkpoint {tag} was saved by 2 processes and DeepSpeed could not convert it for 1 (")
    assert message.endswith("); resume it on 2 processes (deepspeed --num_gpus 2 ... --resume step-0000004).")
    assert "\n" not in message and not (tmp_path / "universal" / tag.name / "zero").exists()
