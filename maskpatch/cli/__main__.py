"""``python -m maskpatch.cli <command>``: the same as the ``maskpatch`` console script."""

import sys

from . import main

sys.exit(main())
