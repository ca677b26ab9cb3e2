import sys

from trigflow_distill.models.wan_vae.api import main

sys.exit(main())
