"""``python -m regpipe`` (also what ``torchrun -m regpipe`` runs)."""

import sys

from regpipe.cli import main

sys.exit(main())
