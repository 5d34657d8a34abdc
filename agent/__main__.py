"""``python -m memagent`` runs the CLI."""

import sys

from memagent.cli import main

sys.exit(main())
