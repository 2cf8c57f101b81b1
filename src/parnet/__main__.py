"""``python -m parnet`` is the ``parnet`` command."""

import sys

from .cli import main

sys.exit(main())
