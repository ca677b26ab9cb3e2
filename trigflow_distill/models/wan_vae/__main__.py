"""`python -m trigflow_distill.models.wan_vae` = the console script (see its module's --help)."""

from trigflow_distill.models.wan_vae.api import run

run()
