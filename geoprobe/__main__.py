"""``python -m geoprobe`` runs the command-line application."""
import sys

from .cli import main

sys.exit(main())
