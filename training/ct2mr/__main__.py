"""``python -m ct2mr``: the same as the ``ct2mr`` command."""

import sys

from ct2mr.cli import main

sys.exit(main())
