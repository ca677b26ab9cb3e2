"""`python -m trigflow_distill.prepare` = the console script (see its module's --help)."""

from trigflow_distill.prepare.job import run

run()
