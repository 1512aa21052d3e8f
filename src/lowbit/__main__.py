"""``python -m lowbit``: the same as the ``lowbit`` console script."""

import sys

from .cli import main

sys.exit(main())
