"""The workdir lock moved to `trigflow_distill.common.lock` (prepare takes it too); this name stays for importers.

The module object itself is aliased, so monkeypatching either name patches the one lock.
"""

import sys

from trigflow_distill.common import lock

sys.modules[__name__] = lock
