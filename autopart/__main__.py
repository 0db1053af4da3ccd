"""`python -m autopart ...`: the same command line as the `autopart` script."""

from autopart.cli.commands import main

raise SystemExit(main())
