"""`python -m mlx_loom ...`: the same commands as the `mlx-loom` console script."""

import sys

from mlx_loom.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
