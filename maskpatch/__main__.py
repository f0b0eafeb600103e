"""``python -m maskpatch <command>``: the same as the ``maskpatch`` console script."""

import sys

from .cli import main

sys.exit(main())
