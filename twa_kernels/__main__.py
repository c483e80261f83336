import sys

from twa_kernels.cli import main

sys.exit(main())
