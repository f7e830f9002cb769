"""`defect-ds pretrain-base` on a few good images with a toy recipe: the folder loads in stock diffusers,
the scaling factor comes from the data, defects are never seen, and an interrupted stage resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_ds.cli import main
from defect_ds.pretrain import stages
from defect_ds.pretrain.recipe import BaseRecipe

TOY = dict(vae_channels=[32, 32], vae_steps=3, vae_batch_size=4, unet_channels=[32, 32],
           unet_attention=[True, False], text_hidden_size=32,
           unet_steps=3, unet_batch_size=4, val_every_steps=2, save_every_steps=2, warmup_steps=1)


@pytest.fixture(scope="module")
def data(make_synthetic, tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", per_defect=1, good_per_category=6,
                          categories="pill,screw", val_fraction=0.2)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """Made from a TOML config (the toy recipe, but 5 VAE steps), an alias flag and an override (3 VAE steps)."""
    config = tmp_path_factory.mktemp("config") / "pretrain.toml"
    recipe = "".join(f"{name} = {json.dumps(value)}\n" for name, value in {**TOY, "vae_steps": 5}.items())
    config.write_text(f"[recipe]\n{recipe}[run]\nsample_steps = 4\nprogress = false\n")
    out = tmp_path_factory.mktemp("base") / "base"
    assert main(["pretrain-base", str(data), str(out), "--config", str(config), "--sample-steps", "2",
                 "--recipe.vae_steps=3"]) == 0
    return out


def test_base_loads_in_stock_diffusers_and_draws(base):
    from diffusers import StableDiffusionPipeline

    # no torch_dtype: the plain load a user writes (transformers keeps a stored fp16 text encoder fp16,
    # which fails beside diffusers' fp32 UNet)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a pill", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    # the UNet is still stored in fp16 (2 bytes a weight), only the text encoder is not
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 3 * pipe.unet.num_parameters()
    stored = pipe.unet.config.in_channels
    assert stored == pipe.vae.config.latent_channels


def test_scaling_factor_comes_from_the_data(base):
    vae_config = json.loads((base / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215 and vae_config["scaling_factor"] > 0
    recipe = json.loads((base / "recipe.json").read_text())
    assert recipe["vae_steps"] == 3 and recipe["resolution_px"] == 32  # the override beats the file
    assert recipe["unet_channels"] == TOY["unet_channels"]  # the file beats the default
    assert json.loads((base / "samples.json").read_text())["steps"] == 2  # the alias flag beats the file


def test_base_never_sees_defects_and_keeps_its_records(base):
    assert not (base / "train_state").exists()  # finished runs drop their resume state
    log = [json.loads(line) for line in (base / "train_log.jsonl").read_text().splitlines()]
    assert any("val_loss_ema" in r for r in log)
    assert (base / "samples.png").stat().st_size > 0


def test_load_good_leaves_defects_out(data):
    from defect_ds.pretrain.cli import load_good

    images, captions, left_out = load_good(data, "train", None)
    assert left_out > 0 and len(images) == len(captions) > 0
    assert all("sks_" not in c for c in captions)


def test_refuses_a_finished_folder(base, data, capsys):
    assert main(["pretrain-base", str(data), str(base), "--no-progress"]) == 2
    assert "already holds a finished base model" in capsys.readouterr().err


def test_vae_stage_resumes_exactly(tmp_path):
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    recipe = BaseRecipe(**{**TOY, "vae_channels": (32, 32), "vae_steps": 4, "save_every_steps": 2})
    whole = stages.train_vae(images, recipe, tmp_path / "a.pt", lambda step, values: None)

    class Stop(Exception):
        pass

    def interrupt(step, values):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        stages.train_vae(images, recipe, tmp_path / "b.pt", interrupt)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 2
    resumed = stages.train_vae(images, recipe, tmp_path / "b.pt", lambda step, values: None)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_crash_while_saving_the_vae_leaves_nothing_that_fails_the_rerun(data, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(TOY))
    out = tmp_path / "base"
    args = ["pretrain-base", str(data), str(out), "--recipe", str(recipe), "--sample-steps", "1", "--no-progress"]
    save = AutoencoderKL.save_pretrained

    class Killed(Exception):
        pass

    def crash(self, folder, *a, **k):  # config written, weights cut short, then the process dies
        save(self, folder, *a, **k)
        next(Path(folder).glob("*.safetensors")).write_bytes(b"cut")
        raise Killed

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", crash)
    with pytest.raises(Killed):
        main(args)
    assert not (out / "train_state" / "vae").exists()  # no folder that looks saved
    monkeypatch.undo()
    assert main(args) == 0
    assert (out / "model_index.json").is_file()


def test_strokes_touch_only_some_images():
    images = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    out, drawn = stages.add_strokes(images, np.random.default_rng(0), 0.5)
    touched = (out != 0).flatten(1).any(1)
    assert 10 < touched.sum() < 54
    assert torch.equal(drawn, (out != 0).any(1, keepdim=True))  # marked where, and only where, drawn


def test_codec_starts_near_deterministic():
    recipe = BaseRecipe(**{**TOY, "vae_logvar_init": -8.0})
    torch.manual_seed(0)
    vae = stages.build_vae(recipe, 16)
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist
    # std exp(-4) = 0.018 at the start, not diffusers' ~1 that drowned thin strokes in sampling noise
    assert 0.005 < posterior.std.median() < 0.06


def test_recipe_refuses_latents_inpainting_cannot_take(tmp_path, data, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**TOY, "vae_latent_channels": 8}))
    assert main(["pretrain-base", str(data), str(tmp_path / "out"), "--recipe", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "vae_latent_channels=8 must be 4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_auto_precision_is_recorded_as_what_it_resolved_to(base):
    from defect_ds.utils.device import cpu_has_native_bf16

    recipe = json.loads((base / "recipe.json").read_text())
    assert recipe["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert BaseRecipe().precision == "auto"


@pytest.mark.parametrize("field, value, message", [
    ("unet_attention", ["maybe", False], "recipe.unet_attention[0]='maybe' has the wrong type: expected true or "),
    ("vae_steps", "many", "recipe.vae_steps='many' has the wrong type: expected an integer."),
    ("seed", True, "recipe.seed=True has the wrong type: expected an integer."),
    ("vae_stepz", 3, "Unknown setting recipe.vae_stepz; the recipe section knows: seed, vae_channels, "),
])
def test_recipe_fields_of_the_wrong_json_type_are_one_sentence(tmp_path, data, capsys, field, value, message):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**TOY, field: value}))
    assert main(["pretrain-base", str(data), str(tmp_path / "out"), "--recipe", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"defect-ds pretrain-base: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_recipe_json_sets_the_recipe_section_and_flags_beat_it(tmp_path):
    from defect_ds.cli import parse_command
    from defect_ds.pretrain.cli import read_config

    recipe = tmp_path / "recipe.json"  # a finished base's recipe.json: its records are not recipe fields
    recipe.write_text(json.dumps({**TOY, "vae_learning_rate": 1, "data": "d", "resolution_px": 32}))
    cfg = read_config(parse_command(["pretrain-base", "d", "o", "--recipe", str(recipe), "--vae-steps", "7", "--fp32"]))
    assert cfg.recipe.vae_learning_rate == 1 and cfg.recipe.vae_channels == (32, 32)  # tuples, as the defaults
    assert cfg.recipe.vae_steps == 7 and cfg.run.save_fp16 is False


def test_vae_from_reuses_a_finished_codec_and_refuses_one_the_unet_cannot_take(base, data, tmp_path, capsys):
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**TOY, "unet_attention": [True, True]}))  # a UNet change, the codec kept
    out = tmp_path / "attention"
    assert main(["pretrain-base", str(data), str(out), "--recipe", str(recipe), "--vae-from", str(base),
                 "--sample-steps", "1", "--no-progress"]) == 0
    ours, theirs = (load_file(next((b / "vae").glob("*.safetensors"))) for b in (out, base))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    from defect_ds.data.latents import codec_fingerprint

    assert codec_fingerprint(out) == codec_fingerprint(base)  # latents encoded with base's codec train on it
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((base / "vae" / "config.json").read_text())["scaling_factor"]
    assert json.loads((out / "recipe.json").read_text())["vae_from"] == str(base.resolve())
    assert json.loads((out / "unet" / "config.json").read_text())["down_block_types"] == \
        ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]

    recipe.write_text(json.dumps({**TOY, "vae_channels": [32, 32, 32]}))  # an f4 codec asked for
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main(["pretrain-base", str(data), str(bad), "--recipe", str(recipe), "--vae-from", str(base),
                 "--no-progress"]) == 2
    assert "has a codec with 2 levels" in capsys.readouterr().err and not bad.exists()
