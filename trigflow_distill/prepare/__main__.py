import sys

from trigflow_distill.prepare.job import main

sys.exit(main())
