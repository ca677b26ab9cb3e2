"""`prepare`: videos + captions -> a latent dataset (clips, encoders, the sharded job; docs/algorithm.md §9-12)."""
