"""FLOP counting on the meta device (SD 1.5 at 512 px costs no memory) and the throughput meter."""
from __future__ import annotations

import types

import pytest
import torch

from defect_ds.perf.flops import FlopBreakdown, measure_flops, measure_sd15
from defect_ds.perf.mfu import PEAK_BF16_TFLOPS, ThroughputMeter, make_meter, peak_tflops
from defect_ds.model.tiny import SD15_TEXT, TINY_TEXT, TINY_UNET, TINY_VAE


@pytest.fixture(scope="module")
def sd15_lora():
    """LoRA (default targets) with activation checkpointing, images encoded every step."""
    return measure_sd15(512, unet_mode="lora", lora_rank=8, activation_checkpointing=True)


@pytest.fixture(scope="module")
def sd15_full():
    return measure_sd15(512, unet_mode="full", latents_precomputed=True)


def clip_text_forward_flops(cfg: dict, seq: int = 77) -> int:
    """Hand count: per layer q, k, v, out projections, the two MLP matrices, and QK^T plus AV."""
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_layer = 2 * seq * (4 * d * d + 2 * d * ff) + 2 * 2 * seq * seq * d
    return layers * per_layer


def test_sd15_unet_forward_matches_published_cost(sd15_lora):
    # SD 1.5's UNet is commonly quoted at ~0.8 TFLOP (~400 GMAC) per 512 px image and step.
    assert 0.75e12 < sd15_lora.unet_forward < 0.85e12


def test_text_encoder_matches_hand_count(sd15_lora):
    assert sd15_lora.text_encoder == pytest.approx(clip_text_forward_flops(SD15_TEXT), rel=1e-3)
    assert sd15_lora.text_encoder_backward == 0  # frozen encoder, no learned tokens


def test_full_backward_is_twice_forward(sd15_full):
    # input and weight gradients of every layer; conv_in needs no input gradient, so a bit under 2x
    assert sd15_full.unet_backward == pytest.approx(2 * sd15_full.unet_forward, rel=0.02)
    assert sd15_full.unet_backward < 2 * sd15_full.unet_forward


def test_lora_backward_counts_only_input_and_adapter_gradients(sd15_lora, sd15_full):
    assert sd15_lora.unet_backward < 0.65 * sd15_full.unet_backward
    # input gradients alone cost about one forward; adapters add a little on top
    assert 0.9 * sd15_lora.unet_forward < sd15_lora.unet_backward < 1.3 * sd15_lora.unet_forward


def test_recompute_is_hardware_not_model_flops(sd15_lora):
    assert 0 < sd15_lora.recompute < sd15_lora.unet_forward  # checkpointed blocks, not conv_in/out
    assert sd15_lora.hardware_flops == sd15_lora.model_flops + sd15_lora.recompute
    assert sd15_lora.model_flops == (sd15_lora.unet_forward + sd15_lora.unet_backward + sd15_lora.vae_encode
                                     + sd15_lora.text_encoder + sd15_lora.text_encoder_backward)


def test_vae_encode_at_512_costs_more_than_unet_forward(sd15_lora, sd15_full):
    assert sd15_lora.vae_encode > sd15_lora.unet_forward
    assert sd15_full.vae_encode == 0  # latents precomputed


def tiny(**kwargs) -> FlopBreakdown:
    kwargs.setdefault("lora_targets", ["to_q", "to_k", "to_v", "to_out.0"])
    kwargs.setdefault("latents_precomputed", True)  # the VAE is measured elsewhere; keeps these fast
    return measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, resolution_px=64, **kwargs)


@pytest.fixture(scope="module")
def tiny_lora_ti():
    """LoRA rank 8 on the run's default targets plus textual inversion, latents precomputed."""
    from defect_ds.config import LoraConfig

    return tiny(lora_targets=LoraConfig().target_modules, train_text_embeddings=True)


def test_no_recompute_without_checkpointing_or_backward(sd15_full):
    assert sd15_full.recompute == 0  # measured without checkpointing
    frozen = tiny(unet_mode="frozen", activation_checkpointing=True, text_embeddings_precomputed=True)
    assert frozen.unet_backward == 0 and frozen.recompute == 0 and frozen.text_encoder == 0


def test_textual_inversion_adds_backward_to_the_token_vectors(tiny_lora_ti):
    assert tiny_lora_ti.text_encoder_backward > 0
    frozen_ti = tiny(unet_mode="frozen", train_text_embeddings=True)
    assert 0 < frozen_ti.unet_backward < tiny_lora_ti.unet_backward  # input gradients only, no adapters


def test_lora_backward_grows_with_rank(tiny_lora_ti):
    from defect_ds.config import LoraConfig

    rank2 = tiny(lora_rank=2, lora_targets=LoraConfig().target_modules, train_text_embeddings=True)
    assert rank2.unet_backward < tiny_lora_ti.unet_backward
    assert rank2.unet_forward < tiny_lora_ti.unet_forward


def test_flops_scale_with_resolution():
    small = measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, resolution_px=64, unet_mode="frozen")
    big = measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, resolution_px=128, unet_mode="frozen")
    # 4x the pixels: convolutions scale by 4, attention by more (the VAE's one mid-block attention is small)
    assert big.unet_forward >= 4 * small.unet_forward
    assert big.vae_encode == pytest.approx(4 * small.vae_encode, rel=0.05)


def test_bad_unet_mode_is_refused():
    with pytest.raises(ValueError, match="unet_mode"):
        tiny(unet_mode="half")


# ---- peaks and the meter ------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("cpu", None), ("Tesla T4", None)])
def test_peak_table_lookup(name, expected):
    assert peak_tflops(name, 0.0) == expected


def test_peak_override_wins():
    assert peak_tflops("NVIDIA H100 PCIe", 500.0) == 500.0
    assert peak_tflops("cpu", 100.0) == 100.0
    assert PEAK_BF16_TFLOPS["H200"] == 989.0


def test_meter_rates():
    flops = FlopBreakdown(unet_forward=10**12, unet_backward=10**12, recompute=5 * 10**11, vae_encode=0,
                          text_encoder=0)
    meter = ThroughputMeter(flops, world_size=4, peak_tflops=100.0)
    for _ in range(5):
        meter.data_wait(0.1)
        meter.step(2)
    values = meter.report(elapsed=2.0)
    # 10 samples per device in 2 s: 5 samples/s x 2 TFLOP = 10 TFLOP/s model, 12.5 hardware
    assert values["images_per_s"] == pytest.approx(20.0)
    assert values["tflops_per_device"] == pytest.approx(10.0)
    assert values["mfu"] == pytest.approx(0.10)
    assert values["hfu"] == pytest.approx(0.125)
    assert values["data_wait_share"] == pytest.approx(0.25)
    assert values["peak_mem_alloc_gib"] is None and values["cpu_max_rss_gib"] > 0
    # the interval restarted: the caller's own tallies override the empty accumulators
    values = meter.report(elapsed=1.0, samples=3, data_wait=0.5)
    assert values["images_per_s"] == pytest.approx(12.0)
    assert values["data_wait_share"] == pytest.approx(0.5)


def test_meter_without_peak_reports_no_mfu():
    meter = ThroughputMeter(FlopBreakdown(10**9, 0, 0, 0, 0), world_size=1, peak_tflops=None)
    meter.step(4)
    values = meter.report()
    assert values["mfu"] is None and values["hfu"] is None
    assert values["tflops_per_device"] > 0


def test_make_meter_from_a_run(tiny_model_dir, tiny_lora_ti):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from defect_ds.config import RunConfig

    cfg = RunConfig()
    cfg.data.resolution_px, cfg.model.activation_checkpointing = 64, False
    model = types.SimpleNamespace(unet=UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"),
                                  text_encoder=CLIPTextModel.from_pretrained(tiny_model_dir,
                                                                             subfolder="text_encoder"),
                                  text_trains=True)
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    dist_info = types.SimpleNamespace(device=torch.device("cpu"), world_size=2)
    meter = make_meter(cfg.model, cfg.lora, cfg.data.resolution_px, vae, model, dist_info, {"kind": "latents"},
                       peak_tflops_override=cfg.logging.peak_tflops)
    assert meter.flops == tiny_lora_ti  # rank 8, the default targets, learned tokens, no VAE per step
    assert meter.flops.vae_encode == 0 and meter.flops.text_encoder_backward > 0
    # the CPU has no table entry: its fp32 matmul peak is measured, so a CPU run reports MFU too
    assert meter.peak_tflops is not None and meter.peak_tflops > 0 and meter.world_size == 2
    assert meter.report(elapsed=1.0, samples=4)["mfu"] is not None


@pytest.mark.gpu
def test_meter_on_cuda_reports_memory_and_a_plausible_mfu():
    device = torch.device("cuda")
    n = 4096
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    peak = peak_tflops(torch.cuda.get_device_name(device), 0.0)
    meter = ThroughputMeter(FlopBreakdown(2 * n ** 3, 0, 0, 0, 0), world_size=1, peak_tflops=peak, device=device)
    for _ in range(20):
        a @ a  # no sync here: report() must wait for the queued work before reading the clock
        meter.step(1)
    values = meter.report()
    assert values["peak_mem_alloc_gib"] >= 2 * a.numel() * a.element_size() / 2 ** 30
    assert values["peak_mem_reserved_gib"] >= values["peak_mem_alloc_gib"]
    if peak is not None:
        assert 0.05 < values["mfu"] < 1.0


def test_cpu_peak_is_a_matmul_rate_and_bf16_is_native_only_with_its_flags():
    from defect_ds.perf.cpu_peak import matmul_tflops
    from defect_ds.utils.device import cpu_has_native_bf16

    rate = matmul_tflops(torch.float32, size=256, seconds=0.05, threads=1)
    assert 1e-4 < rate < 10  # TFLOP/s of one core: GFLOP/s to a few TFLOP/s, not FLOP/s or PFLOP/s
    assert cpu_has_native_bf16("flags\t\t: fpu sse avx512f avx512_bf16 \n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu sse avx2 avx512f\n")


def test_cached_counts_are_reused_only_for_the_same_arguments(tmp_path, monkeypatch):
    from defect_ds.perf import flops

    args = dict(resolution_px=64, unet_mode="frozen", latents_precomputed=True, text_embeddings_precomputed=True)
    first = flops.cached_measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, cache_dir=tmp_path, **args)
    assert first == measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, **args)
    counted = []
    monkeypatch.setattr(flops, "measure_flops", lambda *a, **k: counted.append(k) or first)
    assert flops.cached_measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, cache_dir=tmp_path, **args) == first
    assert counted == []  # read back, not counted again
    flops.cached_measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, cache_dir=tmp_path, **{**args, "resolution_px": 128})
    assert [k["resolution_px"] for k in counted] == [128]  # another set-up is counted anew
    for entry in tmp_path.glob("*.json"):
        entry.write_text("{cut")
    flops.cached_measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, cache_dir=tmp_path, **args)
    assert len(counted) == 2  # an unreadable entry is counted again
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert flops.cached_measure_flops(TINY_UNET, TINY_VAE, TINY_TEXT, cache_dir=blocked / "sub", **args) == first
