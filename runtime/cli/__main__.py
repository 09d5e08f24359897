"""``python -m artrt.runtime.cli``: the ``artrt`` command."""

import sys

from . import main

sys.exit(main())
