"""`python -m tidesim` is the `tidesim` command."""

from tidesim.cli import main

raise SystemExit(main())
