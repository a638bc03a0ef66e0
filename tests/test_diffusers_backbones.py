"""diffusers models through our adapters agree with diffusers' own schedulers (tiny random models)."""

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DModel

from lightning_nft.diffusers_backbones import EpsilonUNetVelocity, FlowTransformerVelocity, alpha_bar_from_time
from lightning_nft.lora import add_lora, adapters_disabled
from lightning_nft.paths import rf_state_from_vp, rf_time_from_alpha_bar
from lightning_nft.samplers import EulerSolver


def _tiny_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                 pooled_projection_dim=8, out_channels=4).eval()


def test_flow_transformer_euler_step_equals_diffusers_scheduler_step():
    model = _tiny_sd3()
    velocity = FlowTransformerVelocity(model)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(4)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        timestep = sched.timesteps[1]
        out = model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"], timestep=timestep.expand(2)).sample
        sched._step_index = 1
        theirs = sched.step(out, timestep, x).prev_sample
        t, t_next = 1 - sched.sigmas[1], 1 - sched.sigmas[2]
        ours = EulerSolver().step(velocity, x, float(t), float(t_next), cond)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_epsilon_unet_euler_step_equals_ddim_step():
    """DDIM (eta = 0) is exactly Euler on the rectified-flow ODE in rescaled coordinates."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    sched.set_timesteps(10)
    velocity = EpsilonUNetVelocity(unet, sched.alphas_cumprod)
    step_t, prev_t = int(sched.timesteps[3]), int(sched.timesteps[4])
    ab, ab_prev = sched.alphas_cumprod[step_t], sched.alphas_cumprod[prev_t]
    x_vp = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        eps = unet(x_vp, torch.tensor(step_t)).sample
        theirs = sched.step(eps, step_t, x_vp, eta=0.0).prev_sample
        t, t_next = rf_time_from_alpha_bar(ab), rf_time_from_alpha_bar(ab_prev)
        y = rf_state_from_vp(x_vp, ab)
        ours = EulerSolver().step(velocity, y, float(t), float(t_next))
    torch.testing.assert_close(ours, rf_state_from_vp(theirs, ab_prev), rtol=1e-4, atol=1e-4)


def test_alpha_bar_and_timestep_round_trip():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    velocity = EpsilonUNetVelocity(torch.nn.Identity(), sched.alphas_cumprod)
    for k in (0, 10, 250, 999):
        ab = sched.alphas_cumprod[k].double()
        t = rf_time_from_alpha_bar(ab)
        torch.testing.assert_close(alpha_bar_from_time(t), ab)
        torch.testing.assert_close(velocity.timestep_from_alpha_bar(ab.reshape(1)).double(),
                                   torch.tensor([float(k)], dtype=torch.float64), atol=1e-6, rtol=0)


def test_lora_on_a_diffusers_transformer_reference_is_the_base():
    model = _tiny_sd3()
    base_out_model = _tiny_sd3()  # same seed, same weights
    lora_model = add_lora(model, target_modules=["to_q", "to_k", "to_v"], rank=2)
    velocity, base_velocity = FlowTransformerVelocity(lora_model), FlowTransformerVelocity(base_out_model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():
        for p in (p for n, p in lora_model.named_parameters() if "lora_B.default" in n):
            p.add_(0.1)
        with adapters_disabled(lora_model):
            torch.testing.assert_close(velocity(x, t, cond), base_velocity(x, t, cond))
        assert not torch.allclose(velocity(x, t, cond), base_velocity(x, t, cond))
