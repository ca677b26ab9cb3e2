"""DMD2 student and critic updates in PyTorch: the speed baseline of step_speed.py and sampling_speed.py.

Written independently of the JAX code (only the weight-name mapping `models.cosmos_dit.names` is shared), on
diffusers' CosmosTransformer3DModel, with the algorithm of trigflow_distill.methods.dmd2 (docs/algorithm.md §3-7):
TrigFlow preconditioning of a rectified-flow net, Video2World GT frames at sigma 1e-4, backward simulation (first n-1
steps without gradient), DMD loss against the guided teacher, critic (fake-score) loss, AdamW with global-norm
clip and warm-up, skip on non-finite, power EMA of the student. tests/test_torch_dmd2.py checks that its losses,
denoiser and backward simulation equal the JAX ones on the same inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch

from trigflow_distill.models.cosmos_dit import names as sdmap

TAU_MIN = 1e-6  # critic weight 1 / sin^2(tau) guard, and the tau sampling band
LAMBDA_FLOOR = 1e-5  # DMD normaliser floor
TAU_COND = math.atan(1e-4)  # conditional frames are shown to the net at sigma = 1e-4


class NearestResize:
    """Stand-in for torchvision.transforms (diffusers resizes the padding mask with it; torchvision is not
    installable beside the local torch wheel). Same indices as torchvision's NEAREST."""

    class InterpolationMode:
        NEAREST = "nearest"

    class functional:  # noqa: N801 - mirrors torchvision's module name
        @staticmethod
        def resize(img, size, interpolation):
            return torch.nn.functional.interpolate(img, size=size, mode="nearest")


def build_model(net_config, params):
    """diffusers CosmosTransformer3DModel (fp32) holding the JAX `params` of the *net* (no text projection:
    the context is projected once per batch, as in dmd2.py). q/k RMSNorm eps set to Cosmos' 1e-6."""
    from diffusers import CosmosTransformer3DModel

    install_nearest_resize()
    if "crossattn_proj" in params:
        raise ValueError("pass the net params without 'crossattn_proj' (dmd2.split_teacher(params)['net'])")
    config = dataclasses.replace(net_config, crossattn_proj_in_channels=None)
    kwargs = {k: v for k, v in sdmap.diffusers_config(config).items() if not k.startswith("_")}
    model = CosmosTransformer3DModel(**kwargs)
    native = sdmap.state_dict_from_params(jax_to_numpy(params), config)
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sdmap.diffusers_from_native(native).items()}
    model.load_state_dict(sd, strict=True)
    set_cosmos_qk_eps(model)
    return model.float()


def install_nearest_resize():
    """Give diffusers' Cosmos module the torchvision stand-in (when torchvision is absent); returns that module."""
    from diffusers.models.transformers import transformer_cosmos

    if getattr(transformer_cosmos, "transforms", None) is None:
        transformer_cosmos.transforms = NearestResize
    return transformer_cosmos


def set_cosmos_qk_eps(model, eps=1e-6):
    """diffusers hard-codes eps 1e-5 in the q/k RMSNorm; Cosmos (docs/algorithm.md §8) uses 1e-6."""
    for name, module in model.named_modules():
        if name.endswith(("norm_q", "norm_k")):
            module.eps = eps


def jax_to_numpy(tree):
    """Nested dict of arrays -> nested dict of float32 numpy arrays."""
    if isinstance(tree, dict):
        return {k: jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


# ---------------------------------------------------------------------------------------------------------------
# TrigFlow (docs/algorithm.md §1-3)


def coefficients(tau, scaling="rectified_flow", sigma_data=1.0):
    """(c_skip, c_out, c_in, c_noise) of a tau tensor; x0 = c_skip x_tau + c_out net(c_in x_tau, c_noise)."""
    cos, sin = torch.cos(tau), torch.sin(tau)
    if scaling == "rectified_flow":
        denom = cos + sigma_data * sin
        return sigma_data / denom, -sigma_data * sin / denom, sigma_data / denom, sigma_data * sin / denom
    if scaling == "edm":
        return sigma_data * cos, sigma_data * sin, torch.ones_like(cos), 0.25 * torch.log(sigma_data * torch.tan(tau))
    raise ValueError(f"unknown scaling {scaling!r}; use 'rectified_flow' or 'edm'")


def shifted_times(num_steps, shift=5.0):
    """RF times 1 = t_0 > ... > t_k = 0 of a uniform grid under t' = s t / (1 + (s - 1) t); python floats."""
    return [shift * t / (1.0 + (shift - 1.0) * t) for t in (1.0 - j / num_steps for j in range(num_steps + 1))]


def student_taus(num_steps=4, shift=5.0):
    """TrigFlow taus of the k-step student; 4 steps: [pi/2, atan 15, atan 5, atan 5/3]."""
    return [math.atan2(t, 1.0 - t) for t in shifted_times(num_steps, shift)[:-1]]


def sample_tau(generator, batch, shift=5.0):
    """Shifted-uniform tau per sample (B,), kept inside (TAU_MIN, pi/2 - TAU_MIN)."""
    u = torch.rand(batch, generator=generator)
    t = shift * u / (1.0 + (shift - 1.0) * u)
    return torch.atan2(t, 1.0 - t).clamp(TAU_MIN, math.pi / 2 - TAU_MIN)


def _b(v):
    return v.reshape(-1, 1, 1, 1, 1)


def renoise(x0, eps, tau_b, sigma_data=1.0):
    """x_tau = cos tau x0 / sigma_d + sin tau eps, tau per sample (B,)."""
    return torch.cos(_b(tau_b)) * x0 / sigma_data + torch.sin(_b(tau_b)) * eps


# ---------------------------------------------------------------------------------------------------------------
# Video2World denoiser and samplers


@dataclasses.dataclass
class Cond:
    """Per-batch conditioning: GT latents, condition mask (B,1,T,H,W), projected cond / uncond contexts."""

    gt: torch.Tensor
    mask: torch.Tensor
    context: torch.Tensor
    uncond_context: torch.Tensor


def make_cond(latents, text, num_cond_frames, text_proj):
    """Cond from a batch: latents (B,16,T,H,W), raw text (B,L,Cin), num_cond_frames (B,), text_proj (W, b)."""
    b, _, t, h, w = latents.shape
    mask = (torch.arange(t)[None, :] < num_cond_frames[:, None]).float()
    mask = mask[:, None, :, None, None].expand(b, 1, t, h, w).contiguous()

    def project(x):
        return torch.nn.functional.gelu(x @ text_proj[0] + text_proj[1])

    with torch.no_grad():
        return Cond(latents.float(), mask, project(text.float()), project(torch.zeros_like(text.float())))


def denoise(model, x_tau, tau_b, context, cond: Cond, scaling="rectified_flow", sigma_data=1.0):
    """x0 = D(x_tau, tau_b) of a velocity net; GT frames replaced on input and output, seen at tau = atan(1e-4)."""
    b, _, t, h, w = x_tau.shape
    c_skip, c_out, c_in, c_noise = coefficients(_b(tau_b), scaling, sigma_data)
    mask = cond.mask
    net_in = mask * cond.gt / sigma_data + (1.0 - mask) * c_in * x_tau
    cond_noise = coefficients(torch.tensor(TAU_COND), scaling, sigma_data)[3]
    c_noise_bt = torch.where(mask[:, 0, :, 0, 0] > 0.5, cond_noise, c_noise.reshape(b, 1).expand(b, t))
    out = model(
        net_in,
        c_noise_bt.reshape(b, 1, t, 1, 1),
        context,
        condition_mask=mask,
        padding_mask=torch.zeros(1, 1, h, w),
        return_dict=False,
    )[0]
    return mask * cond.gt + (1.0 - mask) * (c_skip * x_tau + c_out * out)


def backward_simulation(x0_fn, eps, n, taus, sigma_data=1.0, with_grad=True):
    """n-step student sample from eps: steps 1..n-1 under no_grad, step n with grad if `with_grad`."""
    x = eps
    with torch.no_grad():
        for j in range(n - 1):
            x = renoise(
                x0_fn(x, torch.full((eps.shape[0],), taus[j])),
                eps,
                torch.full((eps.shape[0],), taus[j + 1]),
                sigma_data,
            )
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return x0_fn(x, torch.full((eps.shape[0],), taus[n - 1]))


# ---------------------------------------------------------------------------------------------------------------
# Losses (docs/algorithm.md §4-5)


def cfg_x0(x0_cond, x0_uncond, guidance):
    return x0_uncond + guidance * (x0_cond - x0_uncond)


def _mean_b(x):
    return x.flatten(1).mean(1)


def _dmd_per_sample(g_x0, x0_fake, x0_teacher):
    lam = _mean_b((g_x0.detach() - x0_teacher).abs()).clamp_min(LAMBDA_FLOOR)
    g = (x0_fake - x0_teacher) / _b(lam)
    return _mean_b((g_x0 - (g_x0 - g).detach()) ** 2), lam, g


def dmd_loss(g_x0, x0_fake, x0_teacher):
    """DMD2 generator loss: value mean g^2, gradient 2g w.r.t. g_x0, g = (x0_fake - x0_T) / lambda; a sample with
    a non-finite loss contributes 0 (and no gradient: its inputs are zeroed first). Returns (loss, aux)."""
    x0_fake, x0_teacher = x0_fake.detach(), x0_teacher.detach()
    with torch.no_grad():
        nan_b = ~torch.isfinite(_dmd_per_sample(g_x0, x0_fake, x0_teacher)[0])
    bad = _b(nan_b)
    loss_b, lam, g = _dmd_per_sample(*(torch.where(bad, torch.zeros_like(x), x) for x in (g_x0, x0_fake, x0_teacher)))
    loss_b = torch.where(nan_b, torch.zeros_like(loss_b), loss_b)
    return loss_b.mean(), {"lambda_b": lam, "loss_b": loss_b, "nan_b": nan_b, "grad_norm_b": _mean_b(g.abs())}


def critic_loss(g_x0, x0_fake, tau_b):
    """Fake-score loss mean_b [ mean (g_x0 - x0_fake)^2 / sin^2 tau ], tau clamped >= 1e-6. Returns (loss, aux)."""
    weight_b = 1.0 / torch.sin(tau_b.clamp_min(TAU_MIN)) ** 2
    loss_b = weight_b * _mean_b((g_x0.detach() - x0_fake) ** 2)
    return loss_b.mean(), {"loss_b": loss_b, "weight_b": weight_b}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and EMA (docs/algorithm.md §6)


def lr_multiplier(n, warmup=100, max_steps=400000):
    """1e-6 -> 0.99 linearly over `warmup` updates, then linearly down to 0.4 at `max_steps` (held after)."""
    if n < warmup:
        return 1e-6 + (0.99 - 1e-6) * n / warmup
    return 0.4 + 0.59 * (max_steps - min(n, max_steps)) / (max_steps - warmup)


def ema_beta(n, gamma):
    return 0.0 if n < 1 else (1.0 - 1.0 / (n + 1.0)) ** (gamma + 1.0)


@dataclasses.dataclass(frozen=True)
class Hparams:
    guidance: float = 4.0
    num_student_steps: int = 4
    shift: float = 5.0
    sigma_data: float = 1.0
    scaling: str = "rectified_flow"
    lr: float = 1e-4
    betas: tuple = (0.0, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    warmup: int = 10
    max_steps: int = 400000
    ema_gamma: float = 6.937203937601809  # power-EMA exponent of EMA rate 0.1 (optim.ema_gamma(0.1))


class DMD2:
    """Teacher (frozen), student + EMA and critic as diffusers models, with AdamW optimizers.

    compile=True runs every network call through torch.compile(model) (same parameters).
    """

    def __init__(self, net_config, teacher_params, hp: Hparams = Hparams(), seed=0, compile=False):
        net = {k: v for k, v in teacher_params.items() if k != "crossattn_proj"}
        p = jax_to_numpy(teacher_params["crossattn_proj"])
        self.text_proj = (torch.tensor(p["kernel"]), torch.tensor(p["bias"]))
        self.hp = hp
        self.teacher = build_model(net_config, net).requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).requires_grad_(True)
        self.critic = copy.deepcopy(self.teacher).requires_grad_(True)
        self.ema = copy.deepcopy(self.teacher)
        wrap = torch.compile if compile else (lambda m: m)
        self.call = {name: wrap(getattr(self, name)) for name in ("teacher", "student", "critic", "ema")}
        self.opt = {name: self._optimizer(getattr(self, name)) for name in ("student", "critic")}
        self.updates = {"student": 0, "critic": 0}
        self.taus = student_taus(hp.num_student_steps, hp.shift)
        self.generator = torch.Generator().manual_seed(seed)

    def _optimizer(self, model):
        hp = self.hp
        return torch.optim.AdamW(
            model.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.adam_eps, weight_decay=hp.weight_decay
        )

    def x0_fn(self, name, cond: Cond, context=None):
        hp = self.hp
        ctx = cond.context if context is None else context
        return lambda x, tau_b: denoise(self.call[name], x, tau_b, ctx, cond, hp.scaling, hp.sigma_data)

    def critic_loss(self, cond: Cond, n, eps_g, tau_d, eps_d):
        """Critic loss on given draws (student sample without gradient, critic with)."""
        with torch.no_grad():
            g_x0 = backward_simulation(self.x0_fn("student", cond), eps_g, n, self.taus, self.hp.sigma_data, False)
        x_d = renoise(g_x0, eps_d, tau_d, self.hp.sigma_data)
        return critic_loss(g_x0, self.x0_fn("critic", cond)(x_d, tau_d), tau_d)

    def student_loss(self, cond: Cond, n, eps_g, tau_d, eps_d):
        """DMD loss on given draws (gradient through the student's last simulation step only)."""
        g_x0 = backward_simulation(self.x0_fn("student", cond), eps_g, n, self.taus, self.hp.sigma_data, True)
        x_d = renoise(g_x0.detach(), eps_d, tau_d, self.hp.sigma_data)
        with torch.no_grad():
            x0_fake = self.x0_fn("critic", cond)(x_d, tau_d)
            x0_teacher = cfg_x0(
                self.x0_fn("teacher", cond)(x_d, tau_d),
                self.x0_fn("teacher", cond, cond.uncond_context)(x_d, tau_d),
                self.hp.guidance,
            )
        return dmd_loss(g_x0, x0_fake, x0_teacher)

    def _draws(self, shape):
        g = self.generator
        return torch.randn(shape, generator=g), sample_tau(g, shape[0], self.hp.shift), torch.randn(shape, generator=g)

    def _step(self, name, loss):
        """backward, skip if non-finite, clip, AdamW at the scheduled lr; returns (ok, grad_norm)."""
        hp, model, opt = self.hp, getattr(self, name), self.opt[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        ok = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip_norm)
        if ok:
            for group in opt.param_groups:
                group["lr"] = hp.lr * lr_multiplier(self.updates[name], hp.warmup, hp.max_steps)
            opt.step()
            self.updates[name] += 1
        return ok, float(norm)

    def critic_update(self, cond: Cond, n: int):
        """One critic step with `n` simulation steps; returns metrics."""
        eps_g, tau_d, eps_d = self._draws(cond.gt.shape)
        loss, _ = self.critic_loss(cond, n, eps_g, tau_d, eps_d)
        ok, norm = self._step("critic", loss)
        return {"critic/loss": loss.item(), "critic/grad_norm": norm, "critic/skipped": float(not ok)}

    def student_update(self, cond: Cond, n: int):
        """One student step with `n` simulation steps, then the EMA update; returns metrics."""
        eps_g, tau_d, eps_d = self._draws(cond.gt.shape)
        loss, aux = self.student_loss(cond, n, eps_g, tau_d, eps_d)
        ok, norm = self._step("student", loss)
        if ok:
            beta = ema_beta(self.updates["student"], self.hp.ema_gamma)
            with torch.no_grad():
                for e, s in zip(self.ema.parameters(), self.student.parameters()):
                    e.lerp_(s, 1.0 - beta)
        return {
            "student/loss": loss.item(),
            "student/grad_norm": norm,
            "student/skipped": float(not ok),
            "student/lambda": float(aux["lambda_b"].mean()),
        }
