"""``python -m infercc.cli``."""

import sys

from . import main

sys.exit(main())
