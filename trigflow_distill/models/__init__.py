"""Network families, one folder each (docs/architecture.md): `cosmos_dit` (the teacher/student DiT), `wan_vae`
(videos <-> latents), `reason1` (the text encoder); `torchfile` reads PyTorch checkpoints without torch, `hub`
resolves `hf://` sources."""

from trigflow_distill.models import cosmos_dit

# A network config's type -> its family's package: what the methods call (`velocity`, `project_text`,
# `unconditional_context`, `text_kind`, `GUIDANCE_EMBEDDER`), docs/architecture.md "What a model family provides".
# A new family is a folder here plus one line.
FAMILIES = {cosmos_dit.DiTConfig: cosmos_dit}


def family(net_config):
    """The model-family package of a network config (e.g. `cosmos_dit` for a `DiTConfig`)."""
    found = FAMILIES.get(type(net_config))
    if found is None:
        raise ValueError(
            f"no model family takes a {type(net_config).__name__} network config; add its folder to models.FAMILIES"
        )
    return found
