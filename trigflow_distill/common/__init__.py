"""What every layer uses: errors, paths, sharding, multi-host set-up and video I/O (no JAX models, no methods)."""
