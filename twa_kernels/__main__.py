import sys

from twa_kernels.cli import run

sys.exit(run())
