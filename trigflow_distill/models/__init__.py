"""Network families, one folder each (docs/architecture.md): `cosmos_dit` (the teacher/student DiT), `wan_vae`
(videos <-> latents), `reason1` (the text encoder); `torchfile` reads PyTorch checkpoints without torch, `hub`
resolves `hf://` sources."""
