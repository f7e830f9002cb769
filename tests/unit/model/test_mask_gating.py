import pytest
import torch

from defect_ds.config import LoraConfig, ModelConfig
from defect_ds.model.mask_gating import enable_mask_gating, grid_for_tokens, mask_context, set_mask
from defect_ds.model.components import add_lora, load_components


@pytest.fixture(scope="module")
def lora_unet(tiny_model_dir):
    torch.manual_seed(0)
    unet = load_components(ModelConfig(pretrained_dir=str(tiny_model_dir))).unet
    add_lora(unet, LoraConfig(rank=4))
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op (B = 0); make the adapters matter
            torch.nn.init.normal_(p, std=0.5)
    enable_mask_gating(unet)
    return unet.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def test_grid_for_tokens():
    assert grid_for_tokens((64, 64), 64) == (8, 8)
    assert grid_for_tokens((64, 64), 16) == (4, 4)
    assert grid_for_tokens((64, 96), 24) == (4, 6)
    with pytest.raises(ValueError):
        grid_for_tokens((64, 64), 77)


def test_gated_layers_exclude_text_keys_values(tiny_model_dir):
    unet = load_components(ModelConfig(pretrained_dir=str(tiny_model_dir))).unet
    add_lora(unet, LoraConfig(target_modules=["to_q", "to_k", "to_v"]))
    names = enable_mask_gating(unet).gated_layers
    assert any(n.endswith("attn1.to_k") for n in names)
    assert any(n.endswith("attn2.to_q") for n in names)
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)


@torch.no_grad()
def test_all_ones_mask_reproduces_plain_lora_exactly(lora_unet):
    x, t, text = _inputs()
    set_mask(lora_unet, None)
    plain = lora_unet(x, t, text).sample
    with mask_context(lora_unet, torch.ones(2, 1, 64, 64)):
        ones = lora_unet(x, t, text).sample
    assert torch.equal(plain, ones)


@torch.no_grad()
def test_zero_mask_is_the_base_model(lora_unet):
    x, t, text = _inputs()
    with mask_context(lora_unet, torch.zeros(2, 1, 64, 64)):
        zeros = lora_unet(x, t, text).sample
    lora_unet.disable_adapters()
    try:
        base = lora_unet(x, t, text).sample
    finally:
        lora_unet.enable_adapters()
    set_mask(lora_unet, None)
    plain = lora_unet(x, t, text).sample
    torch.testing.assert_close(zeros, base)
    assert not torch.allclose(plain, base, atol=1e-3)  # the adapters do change the output


@torch.no_grad()
def test_gate_changes_only_masked_tokens_of_a_gated_layer(lora_unet):
    """In one gated adapter, tokens outside the mask get exactly the base output."""
    name = next(n for n in lora_unet.mask_gate.gated_layers if n.endswith("down_blocks.0.attentions.0"
                                                                             ".transformer_blocks.0.attn1.to_q"))
    layer = lora_unet.get_submodule(name)
    tokens = torch.randn(1, 64, layer.in_features)  # the 8x8 grid of a 64x64 image
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :16] = 1  # top-left: rows 0-3, columns 0-1 of the 8x8 grid
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :2] = True
    inside = inside.flatten()
    base = layer.base_layer(tokens)
    with mask_context(lora_unet, mask):
        gated = layer(tokens)
    set_mask(lora_unet, None)
    ungated = layer(tokens)
    assert torch.equal(gated[0, ~inside], base[0, ~inside])
    torch.testing.assert_close(gated[0, inside], ungated[0, inside])
    assert not torch.allclose(gated[0, inside], base[0, inside])


def test_mask_batch_must_divide(lora_unet):
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="does not divide"):
        with mask_context(lora_unet, torch.ones(3, 1, 64, 64)):
            lora_unet(x, t, text)


def test_max_resize_keeps_a_thin_scratch_that_nearest_drops():
    from defect_ds.model.mask_gating import resize_mask

    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:54, 13] = 1  # a 1 px vertical scratch, off the pixels nearest samples (multiples of 8)
    assert resize_mask(mask, (8, 8), "nearest").sum() == 0
    kept = resize_mask(mask, (8, 8), "max")
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    assert kept[0, 0, 1:7, 1].all() and kept.sum() == 6  # rows 1-6 of column 1, nothing else
    assert torch.equal(resize_mask(torch.ones(1, 1, 64, 64), (4, 4), "max"), torch.ones(1, 1, 4, 4))


@torch.no_grad()
def test_max_gate_opens_the_tokens_a_thin_scratch_crosses(lora_unet):
    name = next(n for n in lora_unet.mask_gate.gated_layers if n.endswith("down_blocks.0.attentions.0"
                                                                             ".transformer_blocks.0.attn1.to_q"))
    layer = lora_unet.get_submodule(name)
    tokens = torch.randn(1, 64, layer.in_features)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:54, 13] = 1
    base = layer.base_layer(tokens)
    try:
        for resize, opened in (("nearest", 0), ("max", 6)):
            enable_mask_gating(lora_unet, resize)
            with mask_context(lora_unet, mask):
                gated = layer(tokens)
            changed = (gated[0] != base[0]).any(-1)
            assert int(changed.sum()) == opened
    finally:
        enable_mask_gating(lora_unet)


def test_the_defaults_gate_as_training_does(lora_unet):
    from defect_ds.model.mask_gating import MaskGate, resize_mask

    assert MaskGate().resize == lora_unet.mask_gate.resize == LoraConfig().mask_resize == "max"
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:54, 13] = 1
    assert torch.equal(resize_mask(mask, (8, 8)), resize_mask(mask, (8, 8), LoraConfig().mask_resize))
