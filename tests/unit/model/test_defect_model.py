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
