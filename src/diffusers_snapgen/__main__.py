"""``python -m diffusers_snapgen ...`` runs the ``snapgen`` command line."""

import sys

from .cli import main

sys.exit(main())
