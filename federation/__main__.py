"""``python -m federation`` is the ``hashfed`` command."""

import sys

from .cli import main

sys.exit(main())
