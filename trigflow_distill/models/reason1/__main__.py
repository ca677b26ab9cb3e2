"""`python -m trigflow_distill.models.reason1` = the console script (see its module's --help)."""

from trigflow_distill.models.reason1.api import run

run()
