"""Samplers (docs/algorithm.md §3): the few-step TrigFlow student, backward simulation, the CFG teacher (Euler, or
NVIDIA's UniPC inference sampler), and the one sampling entry point `sample(settings, ...)` that training samples,
evaluation, `generate` and the benchmarks share."""

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


# NVIDIA's inference scheduler (FlowUniPCMultistepScheduler over a 1000-step training grid): its largest sigma is
# float32(1 - 1/1000), and the network sees the time floor(1000 sigma) / 1000 (int64 timesteps x timestep_scale).
UNIPC_SIGMA_MAX = float(np.float32(0.999))
UNIPC_TRAIN_TIMESTEPS = 1000


def unipc_rf_times(num_steps, shift=5.0):
    """(sigmas (num_steps + 1,), net_times (num_steps,)), float64 numpy: the RF times of NVIDIA's UniPC sampler.

    sigmas: linspace(0.999, 0, num_steps + 1)[:-1] shifted by t' = s t / (1 + (s-1) t), rounded to float32 as the
    reference stores them, then 0. net_times: floor(1000 sigma) / 1000, the time the network is fed at each step.
    """
    t = np.linspace(UNIPC_SIGMA_MAX, 0.0, num_steps + 1)[:-1]
    t = shift * t / (1.0 + (shift - 1.0) * t)
    net_times = np.floor(t * UNIPC_TRAIN_TIMESTEPS) / UNIPC_TRAIN_TIMESTEPS
    sigmas = np.concatenate([t, [0.0]]).astype(np.float32).astype(np.float64)
    return sigmas, net_times


def unipc_coefficients(sigmas):
    """Per-step coefficients of multistep UniPC (order 2, B(h) = e^h - 1 "bh2", data prediction, lower order at
    the first and last step, corrector on every step after the first), float64 numpy, as diffusers'
    UniPCMultistepScheduler / NVIDIA's FlowUniPCMultistepScheduler compute them on the RF schedule alpha = 1 - sigma.

    With m_i the x0 prediction at the predicted sample x_i: corrector x^c_i = cx x_i + cp x^c_{i-1} + cm1 m_{i-1} +
    cm2 m_{i-2} + cu m_i; predictor x_{i+1} = pa x^c_i + pb m_i + pc m_{i-1}. Returns a dict of (N,) arrays.
    """
    sigmas = np.asarray(sigmas, np.float64)
    n = sigmas.shape[0] - 1
    alphas = 1.0 - sigmas
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)  # +inf at sigma = 0
    order = [min(2, n - i, i + 1) for i in range(n)]  # warm-up at the first step, lower order at the last
    c = {k: np.zeros(n) for k in ("cx", "cp", "cm1", "cm2", "cu", "pa", "pb", "pc")}
    for i in range(n):
        if i == 0:
            c["cx"][i] = 1.0
        else:  # UniC with the order of the previous predictor, on the x0 evaluated at this step's predicted sample
            h = lambdas[i] - lambdas[i - 1]
            phi1 = np.expm1(-h)
            b_h = phi1  # bh2: B(h) = e^{-h} - 1 in the data-prediction sign convention (same as h phi_1)
            g1 = phi1 / -h - 1.0
            g2 = g1 / -h - 0.5
            if order[i - 1] == 1:
                rho = np.array([0.5])
                rk = None
            else:
                rk = (lambdas[i - 2] - lambdas[i - 1]) / h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([g1, 2.0 * g2]) / b_h)
            a = alphas[i]
            c["cp"][i] = sigmas[i] / sigmas[i - 1]
            c["cm1"][i] = -a * phi1 + a * b_h * rho[-1]
            c["cu"][i] = -a * b_h * rho[-1]
            if rk is not None:
                c["cm2"][i] = -a * b_h * rho[0] / rk
                c["cm1"][i] += a * b_h * rho[0] / rk
        if sigmas[i + 1] == 0.0:  # last step (order 1): lambda = inf, the sample is the x0 prediction
            c["pb"][i] = 1.0
            continue
        h = lambdas[i + 1] - lambdas[i]
        phi1 = np.expm1(-h)
        a = alphas[i + 1]
        c["pa"][i] = sigmas[i + 1] / sigmas[i]
        c["pb"][i] = -a * phi1
        if order[i] == 2:  # UniP-2 with a_1 = 1/2 (diffusers' simplification for order 2)
            rk = (lambdas[i - 1] - lambdas[i]) / h
            c["pb"][i] += a * phi1 * 0.5 / rk
            c["pc"][i] = -a * phi1 * 0.5 / rk
    return c


def sample_teacher_unipc(x0_cond_fn, x0_uncond_fn, eps, guidance, num_steps=35, shift=5.0, sigma_data=1.0):
    """NVIDIA's default inference sampler: multistep UniPC-2 (bh2) on `unipc_rf_times`, CFG on the x0 prediction.

    x0_*_fn(x_tau, tau_b) -> x0 are TrigFlow denoisers; guided x0 = x0_u + s (x0_c - x0_u) (guidance None: the
    conditional denoiser only). At step i the denoisers run at the quantized time of `unipc_rf_times`; their
    velocity (x_rf - x0) / t_q then gives the x0 at the exact sigma_i, as the reference converts its network's
    velocity with the unquantized sigma. The last step returns that x0. Returns x0 (B, ...).
    """
    sigmas, net_times = unipc_rf_times(num_steps, shift)
    coef = {k: jnp.asarray(v, eps.dtype) for k, v in unipc_coefficients(sigmas).items()}
    sig = jnp.asarray(sigmas[:-1], eps.dtype)
    t_q = jnp.asarray(net_times, eps.dtype)

    def step(i, carry):
        x, x_c_prev, m1, m2 = carry
        tau = rf_t_to_tau(t_q[i], sigma_data)
        x_tau = x * (jnp.cos(tau) + sigma_data * jnp.sin(tau)) / sigma_data
        tau_b = _full_tau(tau, eps)
        x0 = x0_cond_fn(x_tau, tau_b)
        if guidance is not None:
            x0 = cfg_x0(x0, x0_uncond_fn(x_tau, tau_b), guidance)
        m = x - sig[i] * (x - x0) / t_q[i]  # t_q > 0 on every step: the smallest sigma is ~0.128 at 35 steps
        x_c = coef["cx"][i] * x + coef["cp"][i] * x_c_prev + coef["cm1"][i] * m1 + coef["cm2"][i] * m2
        x_c = x_c + coef["cu"][i] * m
        x_next = coef["pa"][i] * x_c + coef["pb"][i] * m + coef["pc"][i] * m1
        return x_next, x_c, m, m1

    zeros = jnp.zeros_like(eps)
    return jax.lax.fori_loop(0, num_steps, step, (eps, zeros, zeros, zeros))[0]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How latents are sampled (hashable: static under jit; docs/algorithm.md §3).

    kind "student": `steps` x0 evaluations on the first `steps` times of the `train_steps`-step schedule; a
    guidance-conditioned student takes `guidance` as an input (§15, the caller's x0 function binds it), a fixed-scale
    student has `guidance` None. kind "teacher": `steps` steps in RF time with CFG scale `guidance` (None or 1: the
    conditional denoiser alone), by `solver` "euler" (Euler on the shifted grid, the DMD2 target's sampler) or
    "unipc" (NVIDIA's inference sampler, `sample_teacher_unipc`).
    """

    kind: str
    steps: int
    guidance: float | None = None
    shift: float = 5.0
    sigma_data: float = 1.0
    train_steps: int = 4
    solver: str = "euler"

    def __post_init__(self):
        if self.kind not in ("student", "teacher"):
            raise ValueError(f"sampler kind {self.kind!r}: use 'student' or 'teacher'")
        if self.solver not in ("euler", "unipc"):
            raise ValueError(f"sampler solver {self.solver!r}: use 'euler' or 'unipc'")
        if self.solver == "unipc" and self.kind != "teacher":
            raise ValueError("solver 'unipc' is a teacher sampler; the student samples with its own k-step schedule")
        if self.solver == "unipc" and self.steps >= 1 and unipc_rf_times(self.steps, self.shift)[1].min() <= 0:
            raise ValueError(
                f"UniPC with {self.steps} steps feeds the network time 0 (floor(1000 t) = 0); use fewer steps"
            )
        if self.kind == "student" and not 1 <= self.steps <= self.train_steps:
            raise ValueError(
                f"the student takes 1 to {self.train_steps} steps (the first k times of its training schedule), "
                f"not {self.steps}"
            )
        if self.kind == "teacher" and self.steps < 1:
            raise ValueError(f"the teacher takes >= 1 steps, not {self.steps}")

    @property
    def uses_cfg(self) -> bool:
        """True when every teacher step evaluates the unconditional denoiser too."""
        return self.kind == "teacher" and self.guidance is not None and not math.isclose(self.guidance, 1.0)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return self.steps * (2 if self.uses_cfg else 1)


def sample(settings: SamplerSettings, x0_cond_fn, x0_uncond_fn, eps):
    """x0 (B, ...) from initial noise eps: the student's k-step sampler or the teacher's CFG Euler or UniPC sampler.

    x0_*_fn(x_tau, tau_b) -> x0 are TrigFlow denoisers; the unconditional one is used by a guided teacher only.
    """
    if settings.kind == "student":
        taus = student_schedule(settings.steps, settings.shift, settings.train_steps)
        return sample_student(x0_cond_fn, eps, taus, settings.sigma_data)
    guidance = settings.guidance if settings.uses_cfg else None
    if settings.solver == "unipc":
        return sample_teacher_unipc(
            x0_cond_fn, x0_uncond_fn, eps, guidance, settings.steps, settings.shift, settings.sigma_data
        )
    return sample_teacher_cfg(
        x0_cond_fn, x0_uncond_fn, eps, guidance, settings.steps, settings.shift, settings.sigma_data
    )
