"""``python -m gradkernels.bench``: see :func:`gradkernels.bench.main`."""

from . import main

raise SystemExit(main())
