"""``python -m ct2mr``: the same as the ``ct2mr`` command."""

import sys

from .cli import main

sys.exit(main())
