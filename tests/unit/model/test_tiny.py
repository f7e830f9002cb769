import os

import pytest
import torch

from defect_ds.model.components import check_model_dir, unet_param_count
from defect_ds.model.tiny import SD15_UNET, make_model_folder


def test_tiny_model_loads_in_stock_pipeline_and_generates(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / sub).exists()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a pill", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0
    assert pipe.vae_scale_factor == 8  # like SD 1.5


def test_tokenizer_accepts_added_tokens(tiny_model_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    assert tok.model_max_length == 77
    tok.add_tokens(["sks_scratch"])
    assert "sks_scratch" in tok.tokenize("a photo of a pill with vertical sks_scratch")


def test_refuses_to_overwrite(tiny_model_dir):
    with pytest.raises(FileExistsError, match="already holds a model"):
        make_model_folder(tiny_model_dir)


def test_sd15_unet_has_860m_parameters_on_meta_device():
    n = unet_param_count(SD15_UNET)
    assert 855e6 < n < 865e6, n


@pytest.mark.parametrize("remove, words", [
    ("unet/config.json", "lacks unet/config.json"),
    ("vae/diffusion_pytorch_model.safetensors", "no vae weights"),
    ("tokenizer/tokenizer.json", "no tokenizer files"),
])
def test_broken_model_folder_is_named(tiny_model_dir, tmp_path, remove, words):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / remove).unlink()
    if remove.startswith("tokenizer"):
        for f in (broken / "tokenizer").glob("*"):
            if f.name != "tokenizer_config.json":
                f.unlink()
    with pytest.raises(FileNotFoundError, match=words):
        check_model_dir(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_dir(tmp_path / "nothing")
