"""``python -m quantdeploy`` runs the CLI."""

import sys

from quantdeploy.cli import main

sys.exit(main())
