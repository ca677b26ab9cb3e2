"""The encoders of a prepare job (docs/algorithm.md §9-11) on a mesh of this process's devices: the Wan2.1 VAE
(clips -> normalised latents), the Reason1 text encoder and the teacher's frozen `crossattn_proj` (captions ->
projected context, stored bfloat16).

- `load_projection(teacher_src)`: the projection's (kernel, bias) from a native Cosmos .pt or a diffusers folder;
- `Encoders(vae_src, text_src, teacher_src)`: `.latents(frames, batch)` and `.context(captions, batch)`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trigflow_distill.common import sharding
from trigflow_distill.models import cosmos_dit, hub, reason1, torchfile, wan_vae
from trigflow_distill.models.cosmos_dit.convert import load_diffusers_folder

_PROJ_KEYS = ("crossattn_proj.0.weight", "crossattn_proj.0.bias")
_TEACHER_PREFIXES = ("net_ema.", "net.", "")  # the EMA weights are the distillation teacher (docs/algorithm.md §9)


def load_projection(src: str, prefix: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(kernel (C_in, C_out), bias (C_out,)) float32 of the teacher's frozen text projection `crossattn_proj`
    (docs/algorithm.md §11), from a native Cosmos .pt (only those two tensors are read) or a diffusers folder."""
    path = hub.resolve(src)
    if os.path.isdir(path):
        _, params = load_diffusers_folder(path)
        if "crossattn_proj" not in params:
            raise ValueError(
                f"--teacher {src}: no crossattn_proj (a net without text projection); pass the teacher "
                "whose projection the training uses"
            )
        p = params["crossattn_proj"]
        return np.asarray(p["kernel"], np.float32), np.asarray(p["bias"], np.float32)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher {src}: no such checkpoint (a native Cosmos .pt or a diffusers folder)")
    sd = torchfile.load(path)
    prefixes = _TEACHER_PREFIXES if prefix == "auto" else (prefix,)
    found = next((p for p in prefixes if all(p + k in sd for k in _PROJ_KEYS)), None)
    if found is None:
        raise ValueError(
            f"--teacher {src}: no {' / '.join(_PROJ_KEYS)} under prefixes {prefixes}; pass the "
            "teacher checkpoint with its text projection (e.g. base/pre-trained/<uuid>_ema_bf16.pt)"
        )
    weight, bias = (np.asarray(sd[found + k], np.float32) for k in _PROJ_KEYS)
    return np.ascontiguousarray(weight.T), bias


@functools.partial(jax.jit, static_argnames=("cfg", "keep_raw"))
def _embed_project(cfg, params, ids_bl, kernel, bias, keep_raw: bool):
    raw = reason1.embed(cfg, params, ids_bl)
    context = cosmos_dit.project_text({"kernel": kernel, "bias": bias}, raw).astype(jnp.bfloat16)
    return (context, raw) if keep_raw else (context, None)


@jax.jit
def _to_pixels(frames_bthw3):
    """uint8 (B, T, H, W, 3) -> float32 (B, 3, T, H, W) in [-1, 1] (as video.resize_and_pad scales them)."""
    return jnp.moveaxis(frames_bthw3.astype(jnp.float32) / 127.5 - 1.0, -1, 1)


class Encoders:
    """The VAE, the text encoder and the teacher's projection on a mesh of this process's devices."""

    def __init__(
        self,
        vae_src: str,
        text_src: str,
        teacher_src: str,
        *,
        text_dtype: str = "bfloat16",
        vae_dtype: str = "float32",
        keep_raw_text: bool = False,
        teacher_prefix: str = "auto",
        num_devices: int | None = None,
    ):
        # Local devices only: each process works through its own units at its own pace (no cross-host collectives).
        devices = jax.local_devices()
        if num_devices is not None and not 1 <= num_devices <= len(devices):
            raise ValueError(f"--devices {num_devices}: this process has {len(devices)} local devices")
        self.mesh = sharding.make_mesh({"data": 1, "fsdp": -1}, devices[:num_devices])
        self.num_devices = self.mesh.size
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, P())
        self.vae_cfg, vae_params = wan_vae.load(vae_src)
        self.vae_params = jax.device_put(vae_params, replicated)
        self.vae_dtype = vae_dtype
        self.text_cfg, self.text_params = reason1.load(text_src, text_dtype, mesh=self.mesh)
        self.tokenizer = reason1.load_tokenizer(text_src)
        kernel, bias = load_projection(teacher_src, teacher_prefix)
        width = self.text_cfg.num_layers * self.text_cfg.hidden_size
        if kernel.shape[0] != width:
            raise ValueError(
                f"--teacher {teacher_src}: crossattn_proj takes {kernel.shape[0]} channels, but the text "
                f"encoder {text_src} gives {self.text_cfg.num_layers} layers x "
                f"{self.text_cfg.hidden_size} = {width}; use the matching teacher / text encoder"
            )
        self.kernel = jax.device_put(kernel, replicated)
        self.bias = jax.device_put(bias, replicated)
        self.keep_raw_text = keep_raw_text

    def _padded(self, x: np.ndarray, batch: int) -> tuple[jax.Array, int]:
        """x padded (repeating its last row) to `batch` rows, on the devices; returns (array, real rows)."""
        n = len(x)
        if n < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        return jax.device_put(x, self.batch_sharding), n

    def latents(self, frames_bthw3: np.ndarray, batch: int) -> np.ndarray:
        """Normalised latents (n, 16, T_lat, H/8, W/8) float32 of n <= batch clips (uint8 (n, T, H, W, 3))."""
        x, n = self._padded(frames_bthw3, batch)
        z = wan_vae.encode(self.vae_cfg, self.vae_params, _to_pixels(x), dtype=self.vae_dtype)
        return np.asarray(jax.device_get(z))[:n]

    def context(self, captions: Sequence[str], batch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(projected context (n, 512, C_out) bfloat16, raw embedding (n, 512, C_in) float32 or None)."""
        ids, n = self._padded(reason1.tokenize(self.tokenizer, list(captions)), batch)
        context, raw = _embed_project(self.text_cfg, self.text_params, ids, self.kernel, self.bias, self.keep_raw_text)
        context = np.asarray(jax.device_get(context))[:n]
        return context, None if raw is None else np.asarray(jax.device_get(raw))[:n]
