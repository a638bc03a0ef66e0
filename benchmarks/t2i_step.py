"""Rollout and training throughput, peak memory and MFU of DiffusionNFT with LoRA on an SD3.5-Medium-sized transformer.

What is measured (one process, one device):

* the denoiser: ``SD3Transformer2DModel`` with SD3.5-Medium's published architecture (24 MMDiT-X layers,
  24 heads of 64, dual attention in layers 0-12, RMS QK-norm, patch 2, 16 latent channels; 2.24 B
  parameters as counted, 18.8 M per LoRA adapter), **randomly initialised** (nothing is downloaded), weights in bf16, wrapped in our adapter
  (``FlowTransformerVelocity``) with LoRA rank 32 / alpha 64 on the attention projections (fp32
  adapters; ``lightning_nft.lora.add_lora``), the SD3 targets of ``lightning_nft.pipelines.sd3``;
* the condition: random text embeddings of SD3's shape (``(B, 333, 4096)``: 77 CLIP + 256 T5 tokens;
  pooled ``(B, 2048)``) -- the text encoders run once per prompt with the embedding cache, not per step;
* **rollout**: ``EulerSolver`` on SD3's own shift-3 grid, ``--steps`` steps (DiffusionNFT samples SD3.5-M
  CFG-free with 10 steps), no gradients, from the old adapter: images per second;
* **training step**: one DiffusionNFT gradient step on a minibatch (``nft_loss``, data space with the
  adaptive weight, as the release): the old adapter's velocity without gradients, the trained adapter's
  with gradients, backward, AdamW on the LoRA parameters: images per second (one noise level per image);
* peak device memory over the run, and the training step's **model FLOP utilisation**: FLOPs counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on one step (matmuls, convolutions and attention, as
  executed: the frozen weights get no weight gradients) divided by the step time and the GPU's dense bf16
  peak (``--peak-tflops``, default from the device name: 989 for H100/H200 SXM).

At 512x512 the latents are 64x64x16 (1024 image tokens). ``--tiny`` swaps in a tiny transformer and
64x64 images on the CPU: a smoke test of the script, its figures mean nothing.

    python benchmarks/t2i_step.py                      # GPU: SD3.5-M size, 512x512, batch 8
    python benchmarks/t2i_step.py --batch 16 --gradient-checkpointing
    python benchmarks/t2i_step.py --tiny               # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_nft.diffusers_backbones import FlowTransformerVelocity
from lightning_nft.lora import OLD_ADAPTER, TRAIN_ADAPTER, active_adapter, add_lora
from lightning_nft.objectives.nft import nft_loss
from lightning_nft.paths import interpolate
from lightning_nft.pipelines.sd3 import SD3_LORA_TARGETS, sd3_time_grid
from lightning_nft.samplers import EulerSolver

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (architecture only)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device: torch.device):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    config = TINY if args.tiny else SD35_MEDIUM
    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel(**config).to(torch.bfloat16)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    backbone = add_lora(FlowTransformerVelocity(model), SD3_LORA_TARGETS, rank=args.rank, alpha=2.0 * args.rank)
    params = [p for p in backbone.parameters() if p.requires_grad]
    latent = args.resolution // 8
    times = sd3_time_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), args.steps, (latent // 2) ** 2)
    return backbone, params, config, (config["in_channels"], latent, latent), times


def condition(config: dict, batch: int, text_len: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    return {"encoder_hidden_states": torch.randn(batch, text_len, config["joint_attention_dim"], generator=g).to(device, torch.bfloat16),
            "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, torch.bfloat16)}


def rollout(backbone, x0, times, cond):
    with active_adapter(backbone, OLD_ADAPTER):
        return EulerSolver().sample(backbone, x0, times.to(x0.device, torch.float32), cond).samples


def train_step(backbone, optimizer, x1, cond, generator, beta: float = 1.0):
    """One DiffusionNFT step on a minibatch of rollouts ``x1`` (data-space loss with the adaptive weight)."""
    b = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
    t = torch.rand(b, generator=generator, device=x1.device)
    r = torch.rand(b, generator=generator, device=x1.device)
    x_t = interpolate(x0, x1, t)
    with torch.no_grad(), active_adapter(backbone, OLD_ADAPTER):
        v_old = backbone(x_t, t, cond)
    with active_adapter(backbone, TRAIN_ADAPTER):
        v = backbone(x_t, t, cond)
    loss = nft_loss(v, v_old, x0, x1, x_t, t, r, beta, space="data").mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny transformer, 64x64, CPU: a smoke test")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="images per rollout batch and per training step (default 8; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=10, help="rollout sampler steps (DiffusionNFT's SD3.5-M recipe: 10)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 333 = 77 CLIP + 256 T5; 8 with --tiny)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: from its name)")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.text_len = args.text_len or (8 if args.tiny else 333)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # small CPU models run fastest on one thread (and the cores may be shared)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    backbone, params, config, shape, times = build(args, device)
    backbone.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cond = condition(config, args.batch, args.text_len, device)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.batch, *shape, generator=g, device=device)
    x1 = rollout(backbone, x0, times, cond)

    rollout_s = timed(lambda: rollout(backbone, x0, times, cond), args.repeats, device)
    train_s = timed(lambda: train_step(backbone, optimizer, x1, cond, g), args.repeats, device)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(backbone, optimizer, x1, cond, g)
    step_flops = counter.get_total_flops()
    peak = peak_tflops(device, args.peak_tflops)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny" if args.tiny else "SD3.5-Medium architecture, random weights",
        "transformer_params_M": round(sum(p.numel() for p in backbone.parameters() if not p.requires_grad) / 1e6, 3),
        "lora_params_M": round(sum(p.numel() for p in params) / 1e6, 2),
        "resolution": args.resolution, "latents": list(shape), "batch": args.batch, "rollout_steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "rollout_images_per_s": round(args.batch / rollout_s, 3),
        "train_images_per_s": round(args.batch / train_s, 3),
        "train_step_tflop": round(step_flops / 1e12, 4),
        "train_achieved_tflops": round(step_flops / train_s / 1e12, 3),
        "mfu": round(step_flops / train_s / (peak * 1e12), 4) if peak else None,
        "peak_tflops_assumed": peak,
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
