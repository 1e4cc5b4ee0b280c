"""``python -m visualglm.kernels.native build|status``."""

import sys

from visualglm.kernels.native import main

sys.exit(main())
