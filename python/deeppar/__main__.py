"""``python -m deeppar`` is the ``deeppar`` command."""

import sys

from deeppar.cli import main

sys.exit(main())
