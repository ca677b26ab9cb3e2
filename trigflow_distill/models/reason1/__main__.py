import sys

from trigflow_distill.models.reason1.api import main

sys.exit(main())
