"""``python -m visualglm`` = the ``visualglm`` command."""

import sys

from visualglm.cli.main import main

sys.exit(main())
