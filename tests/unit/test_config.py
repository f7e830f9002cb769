import json
from pathlib import Path

import pytest

from defect_ds.config import ConfigError, RunConfig, load_config, parse_overrides, save_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    RunConfig().validate()


def test_every_shipped_config_parses():
    """Training configs as a RunConfig; a base recipe (a [recipe] section, `defect-ds pretrain-base --config`)
    as a PretrainConfig. base-attention-32 is the shipped base's recipe with attention at 32x32, nothing else."""
    from defect_ds.pretrain.recipe import PretrainConfig, read_recipe

    files = sorted((ROOT / "configs").glob("*.toml"))
    assert files
    for f in files:
        if "[recipe]" in f.read_text():
            recipe = load_config(f, root=PretrainConfig()).recipe
            if f.stem == "base-attention-32":
                shipped = read_recipe(ROOT / "models" / "tiny-defect-base" / "recipe.json")
                changed = {k for k, v in json.loads(recipe.to_json()).items() if shipped.get(k) != v}
                assert changed == {"unet_attention"} and recipe.unet_attention[0]
        else:
            load_config(f)


def test_file_then_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[train]\nmax_steps = 7\nmicro_batch_size = 2\n[lora]\nrank = 4\n')
    cfg = load_config(f, ["--train.max_steps=9", "--lora.target_modules=to_q,to_v", "--data.hflip", "false"])
    assert cfg.train.max_steps == 9  # command line beats the file
    assert cfg.train.micro_batch_size == 2  # the file beats the default
    assert cfg.lora.rank == 4
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.data.hflip is False


def test_json_round_trip(tmp_path):
    cfg = load_config(None, ["--optimizer.learning_rate=3e-4", "--loss.prediction_type=v_prediction"])
    save_config(cfg, tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 3e-4


@pytest.mark.parametrize("args, words", [
    (["--train.max_steps=ten"], ["train.max_steps", "'ten'", "integer"]),
    (["--train.max_stepz=10"], ["train.max_stepz", "max_steps"]),
    (["--lora.rank=0"], ["lora.rank", "0", "positive"]),
    (["--loss.prediction_type=x0"], ["loss.prediction_type", "'x0'", "epsilon"]),
    (["--data.resolution_px=65"], ["data.resolution_px", "65", "multiple of 8"]),
    (["--model.unet_mode=frozen", "--textual_inversion.enabled=false"], ["Nothing trains"]),
    (["train.max_steps=3"], ["--section.field=value"]),
    (["--loss.unmasked_probability=1.5"], ["loss.unmasked_probability", "1.5", "[0, 1]"]),
    (["--loss.prior_preservation_weight=-1"], ["loss.prior_preservation_weight", "-1"]),
    (["--loss.prior_preservation_weight=1", "--model.unet_mode=full"], ["prior_preservation_weight", "full"]),
    (["--loss.prior_preservation_weight=1", "--lora.mask_gating=false"], ["lora.mask_gating"]),
    (["--loss.prior_preservation_weight=1", "--lora.target_modules=attn1.to_q,attn2.to_v"],
     ["attn2.to_v", "never gated"]),
])
def test_bad_settings_get_one_sentence_naming_the_field(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    message = str(e.value)
    assert "\n" not in message and message.rstrip().endswith(".")
    for w in words:
        assert w in message


def test_unknown_section_and_wrong_type_in_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[trian]\nmax_steps = 1\n')
    with pytest.raises(ConfigError, match=r"Unknown config section \[trian\]"):
        load_config(f)
    f.write_text('[train]\nmax_steps = "many"\n')
    with pytest.raises(ConfigError, match="train.max_steps='many' has the wrong type"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_a_quoted_boolean_means_what_it_says_or_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    for text, expected in (('"no"', False), ('"No"', False), ('"false"', False), ('"0"', False), ('"yes"', True),
                           ("false", False)):
        f.write_text(f"[lora]\nmask_gating = {text}\n")
        assert load_config(f).lora.mask_gating is expected, text
    for text in ('"off"', '""', "0", '"nope"'):  # neither clearly true nor clearly false: refused
        f.write_text(f"[lora]\nmask_gating = {text}\n")
        with pytest.raises(ConfigError, match=r"lora.mask_gating=.* has the wrong type: expected true or false"):
            load_config(f)


def test_parse_overrides_space_form():
    assert parse_overrides(["--a.b", "1", "--c.d=2"]) == {"a": {"b": "1"}, "c": {"d": "2"}}


def test_train_script_rejects_bad_config_fast(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--lora.rank=-1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "lora.rank=-1 is invalid" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_commands_with_a_config_take_overrides_anywhere_and_others_refuse_them(capsys):
    from defect_ds.cli import parse_command

    args = parse_command(["generate", "--sampling.steps", "3", "out", "--steps", "2", "--masks.kind=blob"])
    assert args.out_dir == "out" and args.overrides == ["--sampling.steps", "3", "--masks.kind=blob"]
    assert vars(args)["sampling.steps"] == 2  # the alias flag, typed; the override wins in the loader
    with pytest.raises(SystemExit):
        parse_command(["make-tiny-model", "work/tiny", "--model.x=1"])
    assert "unrecognized arguments: --model.x=1" in capsys.readouterr().err
