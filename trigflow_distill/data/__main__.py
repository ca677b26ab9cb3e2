"""`python -m trigflow_distill.data write ...` = `python -m trigflow_distill.data.cli ...`."""

import sys

from trigflow_distill.data.cli import main

if len(sys.argv) < 2 or sys.argv[1] != "write":
    sys.exit("usage: python -m trigflow_distill.data write --latents L.npy --text T.npy --out DIR [...]")
sys.exit(main(sys.argv[2:]))
