"""``python -m lm_mini.cli ...``: what torchrun, srun and the sweeps start on every rank."""
import sys

from lm_mini.cli import main

sys.exit(main())
