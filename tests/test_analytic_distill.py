"""End-to-end DMD2 distillation of an analytic teacher (issue 2): the test of the whole TrigFlow / DMD2 math.

Data: a class-conditional Gaussian mixture in 2-D: three isotropic components (std 0.3) on a triangle, shared by
both classes with class-specific weights. Its exact denoiser E[x0 | x_tau, class] is closed-form and is the
teacher; the unconditional teacher is the mixture over classes, guided with standard CFG. Student and critic are
MLPs on top of the unguided conditional teacher (last layer zero-initialised, so both start as the teacher, as in
DMD2), trained by the shipped `dmd2.student_update` / `dmd2.critic_update` (the mixture enters through
`dmd2.Algo.condition`), so the skip, clipping, optimizer and power-EMA path is what this test proves;
1 student : 4 critic updates, all updates jitted inside one lax.scan.

Two choices, both measured while building this test:
- n = 4 in backward simulation (not n ~ U{1..4}): with a random n the critic learns the mixture over n of the
  student's n-step outputs, and DMD's fixed point only pins that mixture to the teacher; on this toy the 4-step
  output then stays biased (energy distance ~0.05-0.09 instead of ~0.01 at guidance 1).
- guidance s = 2: DMD matches the guided denoiser at every noise level, which for strong guidance is not the
  distribution the guided ODE sampler produces (at s = 4 the two differ by far more than the tolerances below).
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.core import optim, sampling
from trigflow_distill.core.trigflow import TAU_MAX, TAU_MIN
from trigflow_distill.methods import dmd2, train_state, video2world

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


# ---- student and critic: teacher + zero-initialised MLP residual, one MLP per class ----------------------------
HIDDEN, LAYERS = 128, 3


def mlp_init(key, guidance_input=False):
    """Per-class MLP weights stacked on a leading class axis; zero last layer = the (unguided) conditional teacher.
    guidance_input: one more input feature, the CFG scale (a guidance-conditioned student, docs/algorithm.md §15)."""
    sizes = [2 + 3 + int(guidance_input)] + [HIDDEN] * LAYERS + [2]
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


def denoiser(params, x_bd, tau_b, class_b, guidance_b=None):
    log_sigma = jnp.log(jnp.tan(jnp.clip(tau_b, TAU_MIN, TAU_MAX)))  # resolves the low-noise end
    inputs = [jnp.cos(tau_b), jnp.sin(tau_b), 0.25 * log_sigma]
    if params[0]["w"].shape[1] > 5:  # guidance input; the teacher's calls give none (its residual is zero anyway)
        inputs.append(jnp.zeros_like(tau_b) if guidance_b is None else guidance_b - 2.0)
    feats = jnp.concatenate([x_bd, jnp.stack(inputs, -1)], -1)
    out_cbd = jax.vmap(_mlp, in_axes=(0, None))(params, feats)
    out_bd = out_cbd[class_b, jnp.arange(x_bd.shape[0])]
    # c_out = sin(tau) (EDM preconditioning) keeps the residual O(tau) near tau = 0, where the critic weight is 1/tau^2.
    return gmm_x0(x_bd, tau_b, class_b) + jnp.sin(tau_b)[:, None] * out_bd


# ---- training: the shipped dmd2.student_update / critic_update with this data plugged in as the conditioning ----
GUIDANCE = 2.0
BATCH = 512
ROUNDS = 1000  # 1000 student + 4000 critic updates
STUDENT_LR, CRITIC_LR = 2e-4, 2e-3  # Adam on a 2-D toy (tuned here); docs/algorithm.md §6 warm-up and clipping are kept
TAU_SHIFT = 1.0  # time shift for tau_D; the recipe's 5 targets high-res video latents, this data has unit scale
TAUS = sampling.student_schedule(4)


def gmm_condition(algo, key, teacher, batch):
    """dmd2.Algo.condition for the mixture: the batch is {"label": (B,) class}; the teacher "net" is a zero
    residual (so the conditional teacher is exactly gmm_x0) and the unconditional teacher is the class mixture."""
    class_b = batch["label"]
    return video2world.Conditioning(
        shape=(class_b.shape[0], 2),
        x0_fn=lambda params, x, t, guidance_b=None: denoiser(params, x, t, class_b, guidance_b),
        x0_uncond_fn=lambda params, x, t: gmm_x0(x, t, jnp.full_like(class_b, UNCOND)),
    )


# n = 4 always in backward simulation (see the module docstring); it still runs 3 steps without gradient.
ALGO = dmd2.Algo(
    net_config=None,
    sigma_data=SIGMA_DATA,
    guidance=GUIDANCE,
    num_student_steps=len(TAUS),
    condition=gmm_condition,
    sim_steps=len(TAUS),
    renoise_shift=TAU_SHIFT,
)


def train(key, algo=ALGO, rounds=ROUNDS):
    opt_s, opt_c = optim.make_optimizer(STUDENT_LR), optim.make_optimizer(CRITIC_LR)
    k_init, key = jax.random.split(key)
    # zero last layer: exactly the analytic teacher (with a guidance input when the algo draws scales)
    teacher = {"net": mlp_init(k_init, algo.guidance_range is not None), "text_proj": None}
    state = train_state.init_state(teacher, opt_s, opt_c, seed=0)  # student, EMA and critic start as the teacher
    critic_step = functools.partial(dmd2.critic_update, algo, opt_c)
    student_step = functools.partial(dmd2.student_update, algo, opt_s, optim.EMA_GAMMA)

    @jax.jit
    def run(state, keys_r5):
        def batch(k):
            return {"label": jax.random.randint(k, (BATCH,), 0, NUM_CLASSES)}

        def one_round(state, keys_5):  # iteration i is a student step iff i % 5 == 0 (docs/algorithm.md §6)
            state, s_metrics = student_step(state, teacher, batch(keys_5[0]))
            state, c_metrics = jax.lax.scan(lambda s, k: critic_step(s, teacher, batch(k)), state, keys_5[1:])
            return state, (s_metrics["student/loss"], c_metrics["critic/loss"].mean())

        return jax.lax.scan(one_round, state, keys_r5)

    state, step_losses = run(state, jax.random.split(key, (rounds, 5)))
    assert int(state.total_skips) == 0 and int(state.student_updates) == rounds
    return {"student": state.student, "ema": state.student_ema}, step_losses


@functools.cache
def trained_default():
    """train(key(0)) with ALGO, computed once per pytest process (this file and tests/test_rcm.py both need it)."""
    return train(jax.random.key(0))


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


@functools.partial(jax.jit, static_argnames=("num_steps", "guidance"))
def teacher_samples(eps, cls, num_steps, guidance=GUIDANCE):
    class_b = jnp.full((eps.shape[0],), cls)
    return sampling.sample_teacher_cfg(
        lambda x, t: gmm_x0(x, t, class_b),
        lambda x, t: gmm_x0(x, t, jnp.full_like(class_b, UNCOND)),
        eps,
        guidance,
        num_steps=num_steps,
    )


@jax.jit
def student_samples(params, eps, cls, guidance=None):
    class_b = jnp.full((eps.shape[0],), cls)
    guidance_b = None if guidance is None else jnp.full((eps.shape[0],), guidance)
    return sampling.sample_student(lambda x, t: denoiser(params, x, t, class_b, guidance_b), eps, TAUS)


# Thresholds. Energy distance (the main criterion) between two independent 2000-sample sets of the 35-step teacher:
# ~0.001-0.004 (sampling floor); the teacher's own 4-step sampler ~0.14, its 1-step sampler ~0.63. The student must
# be below 0.04 and below 0.3x the better few-step teacher. Component means (components holding >= 15%) within 0.1,
# as the issue suggests. Component weights within 0.07 rather than 0.05: at s = 2 the guided DMD fixed point gives
# the component shared by both classes ~0.03-0.05 more weight than the guided ODE sampler does (in runs of 800 to 1200
# rounds alike, so systematic, not training noise).
MAX_ENERGY, MAX_ENERGY_VS_TEACHER, MAX_DW, MAX_DMEAN, MIN_WEIGHT_FOR_MEAN = 0.04, 0.3, 0.07, 0.1, 0.15


@pytest.mark.slow
def test_dmd2_student_matches_guided_teacher():
    start = time.perf_counter()
    state, (s_loss, c_loss) = trained_default()
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
            print(
                f"class {cls} {name:22s} energy {energy:.4f}  max|dw| {dw:.3f}  "
                f"max|dmean| {results[cls, name][2]:.3f}  weights {w.round(3).tolist()}"
            )
    print(
        f"train {train_s:.1f} s ({ROUNDS} student + {4 * ROUNDS} critic updates), "
        f"total {time.perf_counter() - start:.1f} s; student DMD loss mean of first/last 20 updates "
        f"{float(s_loss[:20].mean()):.3f}/{float(s_loss[-20:].mean()):.3f}"
    )

    for cls in range(NUM_CLASSES):
        energy, dw, dmean = results[cls, "student4_ema"]
        teacher_few = min(results[cls, "teacher1"][0], results[cls, "teacher4"][0])
        assert energy < MAX_ENERGY and energy < MAX_ENERGY_VS_TEACHER * teacher_few, (cls, energy, teacher_few)
        assert dw < MAX_DW and dmean < MAX_DMEAN, (cls, dw, dmean)
        assert results[cls, "student4_at_init"][0] > 2 * energy  # training, not the teacher-based init, did it


# ---- the guidance-conditioned student (docs/algorithm.md §15) -------------------------------------------------
GUIDANCE_RANGE = (1.0, 3.0)
GUIDANCE_EVAL = (1.0, 2.0, 3.0)
# A family of students takes longer to learn than one: at ROUNDS (1000) the conditioned student's s = 3 energy was
# 0.056 / 0.061 against the fixed student's 0.048 / 0.040 (1.5x for class 1); at 1500 rounds 0.048 / 0.044.
CONDITIONED_ROUNDS = 1500


@pytest.mark.slow
def test_guidance_conditioned_student_matches_the_guided_teacher_at_each_scale():
    """One student trained with s ~ U[1, 3] per sample (CONDITIONED_ROUNDS) matches the guided teacher at s = 1 and 2
    within the fixed-scale test's thresholds, at s = 3 within 1.3x of a student distilled at s = 3 alone (ROUNDS;
    there DMD's fixed point and the guided ODE sampler differ by more than MAX_ENERGY: 0.048 / 0.040, measured), and
    moves with s as the teacher does. Measured (class 0 / 1): energy 0.007 / 0.023 at s = 1, 0.020 / 0.010 at
    s = 2, 0.048 / 0.044 at s = 3. Component weights are not held to MAX_DW: at s = 1 DMD gives a class's 10 %
    component too little weight (2-5 %)."""
    algo = dataclasses.replace(ALGO, guidance_range=GUIDANCE_RANGE)
    conditioned, (s_loss, _) = train(jax.random.key(0), algo, rounds=CONDITIONED_ROUNDS)
    fixed3, _ = train(jax.random.key(0), dataclasses.replace(ALGO, guidance=3.0))
    assert np.all(np.isfinite(np.asarray(s_loss)))
    n_eval = 2000
    keys = jax.random.split(jax.random.key(1), 2)
    for cls in range(NUM_CLASSES):
        eps_ref, eps_test = (jax.random.normal(jax.random.fold_in(k, cls), (n_eval, 2)) for k in keys)
        weights = {}
        for s in GUIDANCE_EVAL:
            ref = np.asarray(teacher_samples(eps_ref, cls, 35, s), np.float64)
            x = np.asarray(student_samples(conditioned["ema"], eps_test, cls, s), np.float64)
            energy = energy_distance(x, ref)
            (w_ref, _), (w, _) = component_stats(ref, cls), component_stats(x, cls)
            weights[s] = (w_ref, w)
            print(f"class {cls} s={s:g} energy {energy:.4f} weights {w.round(3).tolist()} teacher {w_ref.round(3)}")
            if s < 3.0:
                assert energy < MAX_ENERGY, (cls, s, energy)
            else:
                fixed = energy_distance(np.asarray(student_samples(fixed3["ema"], eps_test, cls), np.float64), ref)
                print(f"class {cls} s=3 fixed-scale student energy {fixed:.4f}")
                assert energy < 1.3 * fixed, (cls, energy, fixed)
        # stronger guidance moves weight to the class's favourite component, in the teacher and in the student
        fav = int(np.argmax(WEIGHTS[cls]))
        assert weights[3.0][0][fav] > weights[1.0][0][fav] + 0.05
        assert weights[3.0][1][fav] > weights[1.0][1][fav] + 0.05
