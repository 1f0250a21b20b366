"""``python -m qir`` runs the command line (same as the ``qir`` script)."""

import sys

from qir.tools.cli import main

sys.exit(main())
