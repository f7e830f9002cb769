"""A model on paper of per-GPU memory and step time from 8 to 512 GPUs, by ZeRO stage and accumulation.

Every figure it prints for a GPU is a prediction: no GPU was measured. What it takes as given:

- Training-state bytes per parameter of this trainer (trainable weights, their gradients and AdamW's two
  moments are fp32; bf16 is autocast at compute time), split into what every rank holds and what a
  ZeRO stage shards over N ranks, as DeepSpeed allocates them (`STATE_BYTES`; the fp32 copy ZeRO-1/2 make
  of each rank's partition is deepspeed/runtime/zero/stage_1_and_2.py's `single_partition_of_fp32_groups`;
  ZeRO-3 reuses fp32 weights under autocast instead of copying them, stage3.py `_create_fp32_partitions`).
- Activation bytes per image: what autograd saves in one UNet forward, counted on the meta device
  (`activation_bytes`), and with activation checkpointing the saved block inputs plus the largest
  checkpointed module's activations recomputed in the backward.
- FLOPs per image: `defect_ds/perf/flops.py` on the SD 1.5 architecture (hardware FLOPs: with recompute).
- Communication per optimizer step, per rank, in bf16 (2 bytes per element), ring collectives: stages 0-2
  move 2 x the trainable parameters (reduce-scatter + all-gather, or the all-reduce that equals them);
  stage 3 moves 3 x every parameter in the engine (all-gather in the forward and again in the backward,
  reduce-scatter of the gradients), and does it every micro batch, where stages 0 and 1 reduce once per
  optimizer step and stage 2 reduce-scatters every micro batch and gathers once.
- The step's compute at an assumed MFU (`--mfu`, 0.40 by default: the design target, not a measurement),
  and its communication at the links' nominal per-direction bandwidth; within a node NVLink, across
  nodes the GPU's share of the node's InfiniBand. Two bounds: no overlap (compute + communication) and
  full overlap (the larger of the two).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

GB = 1e9
GIB = 2 ** 30
BF16 = 2

# bytes per trainable parameter: (held by every rank, divided over the N ranks), for this trainer's fp32
# trainable weights; 3o keeps the sharded part in host memory, so on the GPU only the weights' shard is left
STATE_BYTES: dict[str, tuple[float, float]] = {
    "0": (16.0, 0.0),  # weights 4 + gradients 4 + AdamW moments 8, all replicated (plain data parallelism)
    "1": (8.0, 12.0),  # weights and gradients replicated; fp32 partition copy 4 + moments 8 sharded
    "2": (4.0, 16.0),  # weights replicated; partition copy 4, gradients 4 and moments 8 sharded
    "3": (0.0, 16.0),  # weights 4 (no copy under autocast), gradients 4, moments 8, all sharded
    "3o": (0.0, 4.0),  # the weights' shard on the GPU; the other 12 (+4 copy) per shard in host memory
}
HOST_BYTES_3O = 16.0  # per parameter, divided over the ranks of a node's host memory
FROZEN_BYTES = BF16  # frozen weights are stored in the compute dtype; ZeRO-3 shards those of the engine
BUCKET_ELEMENTS = 50_000_000  # ds_configs: reduce / all-gather / prefetch buckets of 5e7 elements
HEADROOM = 0.9  # a setting fits when it needs at most this share of the device (fragmentation, spikes)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense
    nvlink_gbps: float  # GB/s per GPU per direction (half the bidirectional figure NVIDIA quotes)
    ib_gbps: float  # GB/s per GPU per direction across nodes (the node's InfiniBand over its 8 GPUs)
    gpus_per_node: int = 8
    source: str = ""


DEVICES = (
    Device("A100 80GB SXM", 80, 312, 300, 25,
           source="NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 312 dense / 624 "
           "sparse, 80 GB HBM2e; NVLink 600 GB/s bidirectional (NVIDIA blog, Introducing NVIDIA HGX A100); DGX A100: "
           "8x ConnectX-6 200 Gb/s HDR InfiniBand (nvidia.com/en-us/data-center/dgx-a100)"),
    Device("H100 80GB SXM", 80, 989, 450, 50,
           source="NVIDIA H100 datasheet: BF16 1,979 with sparsity, 989 dense; NVLink 900 GB/s bidirectional "
           "(nvidia.com/technologies/hopper-architecture); DGX H100: 8x ConnectX-7 400 Gb/s (DGX SuperPOD H100 "
           "reference architecture, docs.nvidia.com/dgx-superpod)"),
    Device("H200 141GB SXM", 141, 989, 450, 50,
           source="141 GB per GPU (DGX BasePOD reference architecture: 1,128 GB per 8 H200, "
           "docs.nvidia.com/dgx-basepod); "
           "NVLink 900 GB/s (hopper-architecture page); 8x ConnectX-7 400 Gb/s (same BasePOD page); bf16 dense "
           "taken equal to H100's (the same GH100 compute die): no NVIDIA source for it was at hand"),
)


@dataclass(frozen=True)
class Workload:
    """What one training run holds and computes, per image where it says so."""
    name: str
    trainable: int  # parameters that train (in the DeepSpeed engine)
    frozen_engine: int  # frozen parameters inside the engine (ZeRO-3 shards them): the UNet under LoRA
    frozen_outside: int  # frozen parameters every rank holds whole: text encoder, VAE
    activation_bytes: float  # per image, without activation checkpointing
    activation_bytes_ckpt: float  # per image, with it
    flops: float  # hardware FLOPs per image without checkpointing (forward + backward + encoders)
    flops_ckpt: float  # the same with the recompute


def state_bytes(stage: str, trainable: int, frozen_engine: int, world: int) -> float:
    """Training states and frozen engine weights one rank holds on the device."""
    replicated, sharded = STATE_BYTES[stage]
    frozen = frozen_engine * FROZEN_BYTES / (world if stage in ("3", "3o") else 1)
    return trainable * (replicated + sharded / world) + frozen


def buffer_bytes(stage: str, trainable: int, frozen_engine: int = 0) -> float:
    """DeepSpeed's communication buckets (ds_configs: 5e7 elements, fewer when there is less to move): an fp32
    gradient-reduce bucket for stage 1, two for stage 2 (reduce and the averaged partition), bf16 prefetch and
    live gathered parameters, frozen ones included, for stage 3; none for plain data parallelism."""
    if stage in ("3", "3o"):
        return min(BUCKET_ELEMENTS, trainable + frozen_engine) * BF16 * 2
    return {"0": 0.0, "1": 4.0, "2": 8.0}[stage] * min(BUCKET_ELEMENTS, trainable)


def memory_per_gpu(w: Workload, stage: str, world: int, micro_batch: int, checkpointing: bool,
                   overhead_bytes: float = 3 * GIB) -> float:
    """Predicted peak bytes on one GPU (`overhead_bytes`: CUDA context, kernels, allocator slack; assumed)."""
    act = w.activation_bytes_ckpt if checkpointing else w.activation_bytes
    return (state_bytes(stage, w.trainable, w.frozen_engine, world) + w.frozen_outside * FROZEN_BYTES
            + buffer_bytes(stage, w.trainable, w.frozen_engine) + micro_batch * act + overhead_bytes)


def comm_bytes_per_step(w: Workload, stage: str, world: int, accum: int) -> float:
    """Bytes one rank sends (= receives) per optimizer step in ring collectives of bf16 elements."""
    if world == 1:
        return 0.0
    ring = (world - 1) / world
    if stage in ("0", "1"):  # gradients all-reduced once per optimizer step (2x: reduce-scatter + all-gather)
        elements = 2 * w.trainable
    elif stage == "2":  # gradients reduce-scattered every micro batch, weights gathered once per step
        elements = accum * w.trainable + w.trainable
    else:  # weights gathered for the forward and the backward, gradients reduce-scattered, every micro batch
        elements = accum * (2 * (w.trainable + w.frozen_engine) + w.trainable)
    return elements * BF16 * ring


def link_gbps(device: Device, world: int) -> float:
    """The slowest link a ring over `world` GPUs crosses, per GPU and direction."""
    return device.nvlink_gbps if world <= device.gpus_per_node else device.ib_gbps


@dataclass(frozen=True)
class Prediction:
    device: str
    workload: str
    world: int
    stage: str
    micro_batch: int
    accum: int
    checkpointing: bool
    memory_gb: float
    fits: bool
    compute_s: float
    comm_s: float
    host_gb_per_gpu: float = 0.0

    @property
    def step_s_no_overlap(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def step_s_overlap(self) -> float:
        return max(self.compute_s, self.comm_s)

    @property
    def images_per_s_per_gpu(self) -> float:
        """From the no-overlap bound: the conservative figure."""
        return self.micro_batch * self.accum / self.step_s_no_overlap


def predict(device: Device, w: Workload, stage: str, world: int, micro_batch: int, accum: int,
            checkpointing: bool, mfu: float = 0.40) -> Prediction:
    mem = memory_per_gpu(w, stage, world, micro_batch, checkpointing)
    flops = w.flops_ckpt if checkpointing else w.flops
    compute = micro_batch * accum * flops / (device.bf16_tflops * 1e12 * mfu)
    comm = comm_bytes_per_step(w, stage, world, accum) / (link_gbps(device, world) * GB)
    host = w.trainable * HOST_BYTES_3O / world if stage == "3o" else 0.0
    return Prediction(device.name, w.name, world, stage, micro_batch, accum, checkpointing, mem / GB,
                      mem <= HEADROOM * device.memory_gb * GB, compute, comm, host / GB)


def choose(device: Device, w: Workload, world: int, global_batch: int, stages: Iterable[str] = ("0", "1", "2", "3"),
           micro_batches: Iterable[int] = (1, 2, 4, 8, 16, 32), mfu: float = 0.40) -> Prediction | None:
    """The fitting setting with the most images/s per GPU (no-overlap bound) at a fixed global batch:
    micro batch x accumulation x world = global batch. The model gives every micro batch the same MFU, so
    among settings within 1% of the best it takes the largest micro batch (on a GPU the faster one in
    practice), then the lowest stage (the least communication and state to go wrong)."""
    fitting = []
    for stage in stages:
        for micro in micro_batches:
            if global_batch % (micro * world):
                continue
            accum = global_batch // (micro * world)
            for ckpt in (False, True):
                p = predict(device, w, stage, world, micro, accum, ckpt, mfu)
                if p.fits:
                    fitting.append(p)
    if not fitting:
        return None
    best = max(p.images_per_s_per_gpu for p in fitting)
    near = [p for p in fitting if p.images_per_s_per_gpu >= 0.99 * best]
    return min(near, key=lambda p: (-p.micro_batch, p.stage, p.checkpointing))


# ---- inputs from the real architecture ------------------------------------------------------------
def _fused_attention() -> Any:
    """A stand-in for `F.scaled_dot_product_attention` that saves what the fused kernels save (query, key,
    value, output and the log-sum-exp per query), not the attention matrix: on the meta device PyTorch
    takes the math path, which would save a 4096 x 4096 matrix per head at 512 px that no GPU or CPU
    training run holds."""
    import torch

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover (never run)
            q, k, v, *_ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return FusedAttention.apply(q, k, v)

    return attention


def _forward(unet: Any, latents: Any, timesteps: Any, text: Any) -> None:
    from unittest import mock

    with mock.patch("torch.nn.functional.scaled_dot_product_attention", _fused_attention()):
        unet(latents, timesteps, text)


def activation_bytes(unet: Any, latents: Any, timesteps: Any, text: Any, checkpointing: bool) -> float:
    """Bytes autograd saves in one forward of `unet` (meta tensors, so nothing is allocated), with attention
    as the fused kernels keep it. With checkpointing: the saved inputs of the checkpointed modules plus the
    largest one's own activations, which its recompute holds during the backward."""
    import torch

    counted = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_weight(t):
            counted[0] += t.numel() * t.element_size()
        return t

    largest = 0
    if checkpointing:  # per-module sizes come from a run without checkpointing
        largest = activation_sizes_of_checkpointed_modules(unet, latents, timesteps, text)
        unet.enable_gradient_checkpointing()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward(unet, latents, timesteps, text)
    if checkpointing:
        unet.disable_gradient_checkpointing()
        return float(counted[0] + largest)
    return float(counted[0])


def _is_weight(t: Any) -> bool:
    """A parameter, or a view of one (a linear layer saves its weight transposed): not an activation."""
    import torch

    return isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter)


def activation_sizes_of_checkpointed_modules(unet: Any, latents: Any, timesteps: Any, text: Any) -> int:
    """The largest saved-activation total of one module diffusers checkpoints (a ResNet block or a
    transformer block), from a forward without checkpointing."""
    import torch

    kinds = ("ResnetBlock2D", "Transformer2DModel")
    sizes: dict[int, int] = {}
    stack: list[int] = []

    def pre(module: Any, _args: Any) -> None:
        stack.append(id(module))

    def post(module: Any, _args: Any, _out: Any) -> None:
        stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if stack and not _is_weight(t):
            sizes[stack[-1]] = sizes.get(stack[-1], 0) + t.numel() * t.element_size()
        return t

    handles = []
    for module in unet.modules():
        if type(module).__name__ in kinds:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward(unet, latents, timesteps, text)
    for h in handles:
        h.remove()
    return max(sizes.values(), default=0)


def sd15_workload(unet_mode: str, resolution_px: int = 512, lora_rank: int = 8) -> Workload:
    """The SD 1.5 architecture's numbers (`workload`)."""
    return workload("sd15", unet_mode, resolution_px, lora_rank)


def workload(arch: str, unet_mode: str, resolution_px: int = 512, lora_rank: int = 8) -> Workload:
    """An architecture's numbers at `resolution_px` (`make-tiny-model`'s tiny or sd15): parameters,
    activations (bf16, meta device) and FLOPs (`flops.py`), with precomputed latents and text embeddings
    (the recommended set-up). SD 1.5 takes about half a minute of CPU."""
    import torch

    from defect_ds.config import LoraConfig
    from defect_ds.model.tiny import model_configs
    from defect_ds.perf.flops import TEXT_SEQUENCE_LENGTH, build_meta_unet, measure_flops

    unet_cfg, vae_cfg, text_cfg = model_configs(arch)
    targets = LoraConfig().target_modules
    unet = build_meta_unet(unet_cfg, unet_mode, lora_rank, targets).to(torch.bfloat16)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    hw = resolution_px // 2 ** (len(vae_cfg.get("block_out_channels", (1, 1, 1, 1))) - 1)
    with torch.device("meta"):
        latents = torch.empty(1, unet.config.in_channels, hw, hw, dtype=torch.bfloat16)
        timesteps = torch.zeros(1, dtype=torch.long)
        text = torch.empty(1, TEXT_SEQUENCE_LENGTH, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    act = activation_bytes(unet, latents, timesteps, text, checkpointing=False)
    act_ckpt = activation_bytes(unet, latents, timesteps, text, checkpointing=True)
    kw = dict(resolution_px=resolution_px, unet_mode=unet_mode, lora_rank=lora_rank, lora_targets=targets,
              latents_precomputed=True, text_embeddings_precomputed=True)
    plain = measure_flops(unet_cfg, vae_cfg, text_cfg, **kw, activation_checkpointing=False)
    ckpt = measure_flops(unet_cfg, vae_cfg, text_cfg, **kw, activation_checkpointing=True)
    return Workload(name=f"{'full fine-tuning' if unet_mode == 'full' else f'LoRA rank {lora_rank}'}, "
                         f"{resolution_px} px", trainable=trainable, frozen_engine=total - trainable,
                    frozen_outside=_count(text_cfg, "text") + _count(vae_cfg, "vae"),
                    activation_bytes=act, activation_bytes_ckpt=act_ckpt, flops=float(plain.hardware_flops),
                    flops_ckpt=float(ckpt.hardware_flops))


def _count(config: Any, kind: str) -> int:
    import torch

    with torch.device("meta"):
        if kind == "text":
            from transformers import CLIPTextConfig, CLIPTextModel

            cfg = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(
                {k: v for k, v in dict(config).items() if not k.startswith("_")})
            model = CLIPTextModel(cfg)
        else:
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config({k: v for k, v in dict(config).items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())
