"""Constants of the recipe that several layers share (configs, the method, the data sources, the toy world).

Dependency-free on purpose: config files import it before JAX may start.
"""

# P(N = 0, 1, 2 conditional latent frames) of Video2World training (docs/algorithm.md §7); the config's
# distill.cond_frame_probs defaults to it and the run uses the config's value.
COND_FRAME_PROBS = (0.6, 0.2, 0.2)
