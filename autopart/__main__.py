"""`python -m autopart ...`: the same command line as the `autopart` script."""

from autopart.cli import main

raise SystemExit(main())
