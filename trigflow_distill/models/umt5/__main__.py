"""`python -m trigflow_distill.models.umt5` (see its module's --help)."""

from trigflow_distill.models.umt5.api import run

run()
