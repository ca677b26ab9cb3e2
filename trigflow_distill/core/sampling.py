"""Samplers (docs/algorithm.md §3): the few-step TrigFlow student, backward simulation, the CFG teacher, and the
one sampling entry point `sample(settings, ...)` that training samples, evaluation, `generate` and the benchmarks
share."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.core.losses import cfg_x0
from trigflow_distill.core.trigflow import add_noise, expand_tau, rf_t_to_tau, sample_tau


def shifted_rf_times(num_steps, shift=5.0):
    """RF times 1 = t_0 > ... > t_{num_steps} = 0: uniform grid mapped by t' = s t / (1 + (s-1) t); float64 numpy."""
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


def student_schedule(num_steps=4, shift=5.0, train_steps=4):
    """TrigFlow taus of the k-step student, float64 numpy (num_steps,): the first k of the train_steps schedule.

    The train_steps-step schedule is the shifted RF grid (4 steps: [pi/2, atan 15, atan 5, atan 5/3]). Sampling
    with k < train_steps uses its first k times, the states backward simulation trains on (docs/algorithm.md §3,
    §13): k = 2 gives [pi/2, atan 15], not a re-spaced 2-step grid.
    """
    if not 1 <= num_steps <= train_steps:
        raise ValueError(
            f"num_steps must be in [1, train_steps={train_steps}] (the student is trained on the first "
            f"train_steps times of its schedule), got {num_steps}"
        )
    t = shifted_rf_times(train_steps, shift)[:num_steps]
    # Same mapping as trigflow.rf_t_to_tau (sigma_d = 1), kept in float64 so the schedule is exact.
    return np.arctan2(t, 1.0 - t)


def _full_tau(tau, eps):
    return jnp.full(eps.shape[:1], tau, dtype=eps.dtype)


def sample_student(x0_fn, eps, taus, sigma_data=1.0):
    """k-step student sampling, k = len(taus): one x0_fn call per tau, re-noising with the same eps each time.

    x0_fn(x_tau, tau_b) -> x0 with tau_b of shape (B,); eps (B, ...) is the initial noise. Returns x0 (B, ...).
    """
    taus = jnp.asarray(taus, dtype=eps.dtype)
    x = eps
    x0 = eps
    for j in range(taus.shape[0]):
        x0 = x0_fn(x, _full_tau(taus[j], eps))
        if j + 1 < taus.shape[0]:
            x = add_noise(x0, eps, taus[j + 1], sigma_data)
    return x0


def draw_num_steps(key, max_steps=4):
    """Backward-simulation length n ~ U{1..max_steps}, an int32 scalar (use one key shared by all devices)."""
    return jax.random.randint(key, (), 1, max_steps + 1, dtype=jnp.int32)


def backward_simulation(x0_fn, params, eps, n, taus, sigma_data=1.0, with_grad=True):
    """The student's n-step sample G_x0 (DMD2 §4.5) with gradient through the last step only (or none).

    x0_fn(params, x_tau, tau_b) -> x0; eps (B, ...) initial noise; n a (traced) int in [1, len(taus)]; taus the
    student schedule. Steps 1..n-1 run in a while loop on stop_gradient(params), so one compiled function serves
    every n and reverse-mode differentiation never enters the loop; step n sees `params` itself if with_grad.
    """
    taus = jnp.asarray(taus, dtype=eps.dtype)
    frozen = jax.lax.stop_gradient(params)
    eps = jax.lax.stop_gradient(eps)

    def no_grad_step(j, x):
        # stop_gradient on the output too: values x0_fn closes over (e.g. a context being differentiated) must not
        # give the loop carry a tangent, since a while loop cannot be transposed.
        x0 = jax.lax.stop_gradient(x0_fn(frozen, x, _full_tau(taus[j], eps)))
        return add_noise(x0, eps, taus[j + 1], sigma_data)

    x_n = jax.lax.fori_loop(0, n - 1, no_grad_step, eps)
    return x0_fn(params if with_grad else frozen, x_n, _full_tau(taus[n - 1], eps))


def backward_simulation_random(x0_fn, params, eps, n, key, shift=5.0, sigma_data=1.0, with_grad=True):
    """Backward simulation at random decreasing times with fresh noise (NVlabs/rcm's default; docs/algorithm.md §3).

    Step 1 starts from eps at tau_0 = pi/2; each later step j re-noises the previous x0 at
    tau_j = min(tau_{j-1}, tau'_j), tau'_j ~ the shifted-uniform time of §2 drawn per sample, with fresh noise
    eps_j. Gradient through the last step only (or none), as `backward_simulation`. `key` drives the draws.
    """
    frozen = jax.lax.stop_gradient(params)
    eps = jax.lax.stop_gradient(eps)
    tau0_b = _full_tau(math.pi / 2, eps)

    def no_grad_step(j, carry):
        x, tau_b = carry
        x0 = jax.lax.stop_gradient(x0_fn(frozen, x, tau_b))
        k_tau, k_eps = jax.random.split(jax.random.fold_in(key, j))
        tau_next_b = jnp.minimum(tau_b, sample_tau(k_tau, tau_b.shape, shift=shift))
        fresh = jax.random.normal(k_eps, eps.shape, eps.dtype)
        return add_noise(x0, fresh, expand_tau(tau_next_b, eps.ndim), sigma_data), tau_next_b

    x_n, tau_n_b = jax.lax.fori_loop(0, n - 1, no_grad_step, (eps, tau0_b))
    return x0_fn(params if with_grad else frozen, x_n, tau_n_b)


def sample_teacher_cfg(x0_cond_fn, x0_uncond_fn, eps, guidance, num_steps=35, shift=5.0, sigma_data=1.0):
    """Teacher sampling with classifier-free guidance: Euler in RF time on the shifted grid (docs/algorithm.md §3).

    x0_*_fn(x_tau, tau_b) -> x0 are TrigFlow denoisers; guided x0 = x0_u + s (x0_c - x0_u). guidance None or 1
    uses the conditional denoiser only (one call per step). Returns x0 (B, ...).
    """
    use_cfg = guidance is not None and not (isinstance(guidance, (int, float)) and math.isclose(guidance, 1.0))
    t_grid = jnp.asarray(shifted_rf_times(num_steps, shift), dtype=eps.dtype)

    def step(i, x_rf):
        t, t_next = t_grid[i], t_grid[i + 1]
        tau = rf_t_to_tau(t, sigma_data)
        # The RF state is x_tau * sigma_d / (cos + sigma_d sin): convert to the TrigFlow state the denoisers take.
        x_tau = x_rf * (jnp.cos(tau) + sigma_data * jnp.sin(tau)) / sigma_data
        tau_b = _full_tau(tau, eps)
        x0 = x0_cond_fn(x_tau, tau_b)
        if use_cfg:
            x0 = cfg_x0(x0, x0_uncond_fn(x_tau, tau_b), guidance)
        velocity = (x_rf - x0) / t  # RF velocity eps - x0; t > 0 on every evaluated step
        return x_rf + (t_next - t) * velocity

    return jax.lax.fori_loop(0, num_steps, step, eps)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How latents are sampled (hashable: static under jit; docs/algorithm.md §3).

    kind "student": `steps` x0 evaluations on the first `steps` times of the `train_steps`-step schedule; a
    guidance-conditioned student takes `guidance` as an input (§15, the caller's x0 function binds it), a fixed-scale
    student has `guidance` None. kind "teacher": `steps` Euler steps in RF time with CFG scale `guidance` (None or 1:
    the conditional denoiser alone).
    """

    kind: str
    steps: int
    guidance: float | None = None
    shift: float = 5.0
    sigma_data: float = 1.0
    train_steps: int = 4

    def __post_init__(self):
        if self.kind not in ("student", "teacher"):
            raise ValueError(f"sampler kind {self.kind!r}: use 'student' or 'teacher'")
        if self.kind == "student" and not 1 <= self.steps <= self.train_steps:
            raise ValueError(
                f"the student takes 1 to {self.train_steps} steps (the first k times of its training schedule), "
                f"not {self.steps}"
            )
        if self.kind == "teacher" and self.steps < 1:
            raise ValueError(f"the teacher takes >= 1 Euler steps, not {self.steps}")

    @property
    def uses_cfg(self) -> bool:
        """True when every teacher step evaluates the unconditional denoiser too."""
        return self.kind == "teacher" and self.guidance is not None and not math.isclose(self.guidance, 1.0)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return self.steps * (2 if self.uses_cfg else 1)


def sample(settings: SamplerSettings, x0_cond_fn, x0_uncond_fn, eps):
    """x0 (B, ...) from initial noise eps: the student's k-step sampler or the teacher's CFG Euler sampler.

    x0_*_fn(x_tau, tau_b) -> x0 are TrigFlow denoisers; the unconditional one is used by a guided teacher only.
    """
    if settings.kind == "student":
        taus = student_schedule(settings.steps, settings.shift, settings.train_steps)
        return sample_student(x0_cond_fn, eps, taus, settings.sigma_data)
    guidance = settings.guidance if settings.uses_cfg else None
    return sample_teacher_cfg(
        x0_cond_fn, x0_uncond_fn, eps, guidance, settings.steps, settings.shift, settings.sigma_data
    )
