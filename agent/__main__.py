"""``python -m memagent`` runs the CLI (through :mod:`memagent.entry`, like the console script)."""

import sys

from memagent.entry import main

sys.exit(main())
