"""The model a run trains: built from its sections, and its loss of a batch (no engine, no process group)."""
from __future__ import annotations

import torch

from defect_ds.config import RunConfig
from defect_ds.model.defect_model import build_model


def _model(tiny_model_dir, **model_fields):
    cfg = RunConfig()
    cfg.model.pretrained_dir = str(tiny_model_dir)
    for k, v in model_fields.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.lora, cfg.textual_inversion, cfg.loss, tokens=["sks_scratch"])


def _batch(n: int = 2, res: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, 1, res, res)
    mask[..., 16:32, 16:40] = 1
    return {"pixel_values": torch.rand(n, 3, res, res, generator=g) * 2 - 1, "mask": mask,
            "caption": ["a photo of a pill with sks_scratch"] * n}


def test_loss_is_a_function_of_the_generator_and_trains_only_adapters_and_tokens(tiny_model_dir):
    _, model = _model(tiny_model_dir)
    losses = [model.loss(_batch(), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert losses[0].dim() == 0 and torch.isfinite(losses[0])
    assert torch.equal(losses[0], losses[1])  # noise, timesteps and the VAE sample come from the generator
    assert not torch.equal(losses[0], model.loss(_batch(), torch.Generator().manual_seed(8)))
    losses[0].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or n.endswith("learned_vectors") for n in with_grad)
    assert any(n.endswith("learned_vectors") for n in with_grad)


def test_vae_is_beside_the_module_tree_and_stored_latents_skip_it(tiny_model_dir):
    _, model = _model(tiny_model_dir)
    assert not any(k.startswith("vae.") for k in model.state_dict())  # the checkpoint format holds no VAE
    assert model.mask_gating and model.prompt_text("sks_scratch") == "sks_scratch"
    batch = _batch()
    latents = torch.randn(2, 4, 8, 8)
    stored = {"latents": latents, "mask": batch["mask"], "caption": batch["caption"]}
    encoded = model.encode(stored, torch.Generator().manual_seed(0))
    assert torch.equal(encoded, latents * model.vae.config.scaling_factor)


def test_denoise_is_the_callable_that_runs_the_forward_pass(tiny_model_dir):
    _, model = _model(tiny_model_dir, activation_checkpointing=False)
    calls = []

    def engine(*args):
        calls.append(args)
        return model(*args)

    direct = model.loss(_batch(), torch.Generator().manual_seed(3))
    via = model.loss(_batch(), torch.Generator().manual_seed(3), denoise=engine)
    assert len(calls) == 1 and torch.equal(direct, via)


def _loss_model(tiny_model_dir, **loss_fields):
    """The tiny model with random (non-zero) adapters, so LoRA changes its predictions."""
    cfg, model = _model(tiny_model_dir, activation_checkpointing=False)
    for k, v in loss_fields.items():
        setattr(model.loss_cfg, k, v)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def test_unmasked_probability_one_is_the_loss_of_an_all_ones_mask(tiny_model_dir):
    model = _loss_model(tiny_model_dir)
    batch, ones = _batch(), _batch()
    ones["mask"] = torch.ones_like(batch["mask"])
    masked = model.loss(batch, torch.Generator().manual_seed(5))
    full = model.loss(ones, torch.Generator().manual_seed(5))
    assert not torch.allclose(masked, full)  # the mask matters for this model
    model.loss_cfg.unmasked_probability = 1.0
    unmasked = model.loss(batch, torch.Generator().manual_seed(5))
    torch.testing.assert_close(unmasked, full)  # same noise and timesteps, the gate and loss open everywhere
    assert torch.equal(model.unet.mask_gate.mask, torch.ones_like(batch["mask"]))


def test_unmasked_probability_picks_whole_samples_by_the_generator():
    from defect_ds.model.objective import unmask_some

    mask = torch.zeros(4000, 1, 4, 4)
    mask[..., 1, 1] = 1
    out = unmask_some(mask, 0.25, torch.Generator().manual_seed(0))
    full = out.flatten(1).all(1)
    assert torch.equal(out[~full], mask[~full])  # the rest keep their own mask
    assert 0.22 < full.float().mean() < 0.28
    assert torch.equal(out, unmask_some(mask, 0.25, torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(0)
    assert unmask_some(mask, 0.0, g) is mask and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_prior_preservation_pulls_the_background_to_the_base_model(tiny_model_dir):
    """The added term is the background mean of (prediction - base prediction)^2, the base being the
    UNet with its adapters switched off (not merely the zero mask the code uses for it)."""
    from defect_ds.model.objective import latent_mask

    model = _loss_model(tiny_model_dir)
    batch = _batch()
    calls = []

    def engine(*args):
        calls.append(args)
        return model(*args)

    plain = model.loss(batch, torch.Generator().manual_seed(9))
    model.loss_cfg.prior_preservation_weight = 2.0
    with_prior = model.loss(batch, torch.Generator().manual_seed(9), denoise=engine)
    assert len(calls) == 2 and not calls[0][3].any()  # one extra forward, with a zero mask
    assert torch.equal(model.unet.mask_gate.mask, batch["mask"])  # the batch's mask is set last (backward)
    noisy, t, ids, mask, embeds = calls[1]
    with torch.no_grad():
        pred = model(noisy, t, ids, mask, embeds)
        model.unet.disable_adapters()
        base = model(noisy, t, ids, mask, embeds)
        model.unet.enable_adapters()
    background = 1 - latent_mask(mask, noisy.shape[-2:])
    err = (pred - base).pow(2).mean(1, keepdim=True)
    expected = ((err * background).sum((1, 2, 3)) / background.sum((1, 2, 3))).mean()
    assert expected > 1e-6  # the adapters do change the background through attention
    torch.testing.assert_close(with_prior - plain, 2.0 * expected, rtol=1e-4, atol=1e-7)


def test_prior_preservation_adds_nothing_when_the_adapters_are_zero(tiny_model_dir):
    _, model = _model(tiny_model_dir, activation_checkpointing=False)  # fresh LoRA: B = 0
    plain = model.loss(_batch(), torch.Generator().manual_seed(2))
    model.loss_cfg.prior_preservation_weight = 5.0
    assert torch.equal(model.loss(_batch(), torch.Generator().manual_seed(2)), plain)


def test_channels_last_follows_the_config_in_either_precision(tiny_model_dir):
    cfg = RunConfig()
    cfg.model.pretrained_dir = str(tiny_model_dir)
    for dtype in (torch.bfloat16, torch.float32):
        for channels_last in (True, False):
            cfg.model.channels_last = channels_last
            model = build_model(cfg.model, cfg.lora, cfg.textual_inversion, cfg.loss, tokens=[], compute_dtype=dtype)
            weight = model.unet.conv_in.weight
            assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert weight.dtype == dtype and model.channels_last == channels_last


def test_each_distinct_caption_is_tokenised_once_and_ids_match_the_tokenizer(tiny_model_dir):
    from defect_ds.model.components import tokenize

    _, model = _model(tiny_model_dir)
    calls = []
    real = model.tokenizer.__class__.__call__

    def counting(self, texts, **kwargs):
        calls.append(list(texts))
        return real(self, texts, **kwargs)

    captions = ["a photo of a pill with a sks_scratch", "a tile", "a photo of a pill with a sks_scratch"]
    expected = tokenize(model.tokenizer, [model.prompt_text(c) for c in captions])
    model.tokenizer.__class__.__call__ = counting
    try:
        first = model.token_ids(captions)
        second = model.token_ids(list(reversed(captions)))
    finally:
        model.tokenizer.__class__.__call__ = real
    assert torch.equal(first, expected) and torch.equal(second, expected.flip(0))
    assert calls == [[model.prompt_text(captions[0]), model.prompt_text(captions[1])]]  # once, distinct only


def test_generate_draws_from_its_seed_gates_the_lora_with_the_masks_and_keeps_the_mode(tiny_model_dir):
    _, model = _model(tiny_model_dir)
    with torch.no_grad():  # the adapters start as a no-op (B = 0): give them an effect to gate
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a pill with sks_scratch"]
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:48, 16:48] = 1

    def draw(seed=0, m=masks):
        return model.generate(prompts, resolution_px=64, steps=2, seed=seed, masks=m)

    model.unet.train()
    images = draw()
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0 <= images.min() and images.max() <= 1
    assert model.unet.training and model.unet.mask_gate.mask is None  # mode restored, mask cleared
    assert torch.equal(images, draw()) and not torch.equal(images, draw(seed=1))
    assert not torch.equal(images, draw(m=torch.ones_like(masks)))  # the masks gate what the adapters do
