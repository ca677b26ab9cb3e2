"""Pretrains the tiny Cosmos DiT as a rectified-flow Video2World teacher on the toy world and exports it.

    python -m trigflow_distill.toy.pretrain --out=assets/toy_teacher.pt     # ships as the `:tiny` teacher

Objective (the Predict2.5 teacher's): x_t = (1-t) x0 + t eps, the net predicts the velocity eps - x0 at RF time t.
- t: the docs/algorithm.md §2 shift-5 distribution (u ~ U(0,1), t = 5u / (1 + 4u)), floored at 1e-3. It puts most
  weight near t = 1, as the shift-5 grid of the 35-step teacher sampler, the 4-step student schedule and the DMD2
  critic / teacher time draws all do, so the teacher is trained where it is queried.
- Text dropout: with probability `text_dropout` (default 0.15) the raw text is replaced by zeros, the
  unconditional text of docs/algorithm.md §7, so the same net serves both sides of classifier-free guidance.
- Video2World: each record's first `num_cond_frames` latent frames are ground truth; the net is called through
  `video2world.denoise` (mask channel, GT input and output replacement, t_cond = tan(atan 1e-4)/(1 + tan(atan 1e-4)))
  and the loss covers the non-conditional frames only.
AdamW with warm-up and cosine decay, global-norm clipping; the exported weights are an EMA of the trained ones,
written as a native Cosmos `.pt` (`net.` prefix, bf16) by `convert.export_torch`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from trigflow_distill import toy
from trigflow_distill.common import cli
from trigflow_distill.core import trigflow
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert

T_MIN = 1e-3  # RF-time floor: the velocity (x_t - x0_hat) / t stays well conditioned in float32
TIME_SHIFT = 5.0
RECORD_SEED = 12_345  # RecordSource seed of the pretraining data (its own stream: disjoint from eval clips)


def tiny_config(world: toy.World, **overrides) -> cosmos_dit.DiTConfig:
    """The tiny preset with its text projection sized to the world's raw text width."""
    return cosmos_dit.get_preset("tiny", crossattn_proj_in_channels=world.config.text_width, **overrides)


def velocity_loss(net_config, params, x0_bcthw, text_bld, num_cond_b, tau_b, eps_bcthw):
    """Mean squared error of the velocity estimate against eps - x0 over the non-conditional frames.

    The net is called through `video2world.denoise` at TrigFlow time tau_b (B,) in (0, pi/2]; its x0 estimate gives
    the velocity (x_t - x0_hat) / t with t = tau_to_rf_t(tau) and x_t = (1 - t) x0 + t eps. text_bld is the raw
    text (zeros = unconditional).
    """
    x0 = x0_bcthw.astype(jnp.float32)
    tau = trigflow.expand_tau(tau_b, x0.ndim)
    t = trigflow.tau_to_rf_t(tau)
    x_tau = trigflow.add_noise(x0, eps_bcthw, tau)
    mask = video2world.cond_mask(num_cond_b, x0.shape)
    x0_hat = video2world.denoise(net_config, params, x_tau, tau_b, text_bld, x0, mask, scaling="rectified_flow")
    x_t = (1.0 - t) * x0 + t * eps_bcthw
    v_hat = (x_t - x0_hat) / t
    weight = (1.0 - mask) * jnp.ones_like(x0)
    return jnp.sum(weight * jnp.square(v_hat - (eps_bcthw - x0))) / jnp.maximum(jnp.sum(weight), 1.0)


def rf_loss(net_config, params, batch, key, text_dropout: float = 0.15):
    """`velocity_loss` of one batch with random time (shift 5, t floored at T_MIN), noise and text dropout.

    batch: latents (B,C,T,H,W), text (B,L,Ctext) raw, num_cond_frames (B,) int.
    """
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    tau_b = jnp.maximum(trigflow.sample_tau(k_t, (b,), shift=TIME_SHIFT), trigflow.rf_t_to_tau(T_MIN))
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    drop = jax.random.uniform(k_drop, (b,)) < text_dropout
    text = jnp.where(drop[:, None, None], 0.0, batch["text"].astype(jnp.float32))
    return velocity_loss(net_config, params, x0, text, batch["num_cond_frames"], tau_b, eps)


def make_optimizer(lr: float, steps: int, warmup: int = 200, weight_decay: float = 0.01, clip_norm: float = 1.0):
    """Clip to global norm, AdamW with linear warm-up then cosine decay to lr/20."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2), end_value=lr / 20
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def make_train_step(net_config, tx, text_dropout: float = 0.15, ema_decay: float = 0.999):
    """Jitted step (params, ema, opt_state, batch, key, step) -> (params, ema, opt_state, loss); buffers donated."""

    def step_fn(params, ema, opt_state, batch, key, step):
        loss, grads = jax.value_and_grad(lambda p: rf_loss(net_config, p, batch, key, text_dropout))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # EMA warm-up: early weights are forgotten quickly.
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, ema, opt_state, loss

    return jax.jit(step_fn, donate_argnums=(0, 1, 2))


def _batch(source: toy.RecordSource, step: int, batch_size: int) -> dict:
    records = [source[(step * batch_size + i) % len(source)] for i in range(batch_size)]
    return {k: np.stack([r[k] for r in records]) for k in ("latents", "text", "num_cond_frames")}


def pretrain(
    world: toy.World,
    net_config,
    steps: int = 3500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    text_dropout: float = 0.15,
    ema_decay: float = 0.999,
    log_every: int = 100,
    log=print,
) -> tuple[dict, dict, list[float]]:
    """Trains a teacher from scratch; returns (params, ema_params, losses per step). Deterministic in `seed`."""
    if steps < 1 or batch_size < 1 or lr <= 0 or not 0 <= text_dropout < 1:
        raise ValueError(
            f"pretrain needs steps >= 1, batch_size >= 1, lr > 0 and 0 <= text_dropout < 1; got "
            f"steps={steps}, batch_size={batch_size}, lr={lr}, text_dropout={text_dropout}."
        )
    if net_config.crossattn_proj_in_channels != world.config.text_width:
        raise ValueError(
            f"net crossattn_proj_in_channels={net_config.crossattn_proj_in_channels} must equal the "
            f"world's text_width={world.config.text_width}; build it with tiny_config(world)."
        )
    key = jax.random.PRNGKey(seed)
    k_init, k_train = jax.random.split(key)
    params = cosmos_dit.init_params(net_config, k_init)
    ema = jax.tree.map(jnp.copy, params)
    tx = make_optimizer(lr, steps)
    opt_state = tx.init(params)
    train_step = make_train_step(net_config, tx, text_dropout, ema_decay)
    source = toy.RecordSource(world, seed=RECORD_SEED + seed)
    losses, start, window = [], time.time(), []
    # Records are drawn on a worker thread while the previous step computes.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_batch, source, 0, batch_size)
        for i in range(steps):
            batch = pending.result()
            if i + 1 < steps:
                pending = pool.submit(_batch, source, i + 1, batch_size)
            params, ema, opt_state, loss = train_step(
                params, ema, opt_state, batch, jax.random.fold_in(k_train, i), jnp.float32(i)
            )
            window.append(loss)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                vals = [float(v) for v in window]
                losses.extend(vals)
                window = []
                elapsed = time.time() - start
                if not all(math.isfinite(v) for v in vals):
                    raise RuntimeError(f"non-finite pretraining loss at step {i + 1}; lower --lr.")
                log(
                    f"step {i + 1:5d}/{steps}  loss {np.mean(vals):.4f}  {elapsed:6.1f}s  "
                    f"eta {elapsed / (i + 1) * (steps - i - 1):5.0f}s"
                )
    losses.extend(float(v) for v in window)
    return params, ema, losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-toy-pretrain",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output .pt (native Cosmos layout, net. prefix, bf16)")
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text_dropout", type=float, default=0.15)
    args = parser.parse_args(argv)
    out_dir = epath.Path(args.out).parent  # local or remote (gs://), as export_torch writes it
    if not out_dir.is_dir():
        print(f"error: --out directory {out_dir} does not exist; create it first.", file=sys.stderr)
        return 1
    world = toy.make_world()
    net_config = tiny_config(world)
    print(f"pretraining {net_config} for {args.steps} steps, batch {args.batch_size}, lr {args.lr}", flush=True)
    _, ema, _ = pretrain(
        world,
        net_config,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.text_dropout,
        log=lambda s: print(s, flush=True),
    )
    convert.export_torch(jax.tree.map(np.asarray, ema), net_config, args.out)
    print(f"wrote {args.out} ({epath.Path(args.out).stat().st_size / 2**20:.2f} MiB)")
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
