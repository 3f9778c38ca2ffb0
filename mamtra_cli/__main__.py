"""`python -m mamtra_cli …` (also what torchrun runs: `torchrun --nproc_per_node N -m mamtra_cli distill …`)."""

import sys

from mamtra_cli.cli import main

sys.exit(main())
