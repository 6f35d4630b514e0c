"""``python -m gradkernels.aot``: see :mod:`gradkernels.aot.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
