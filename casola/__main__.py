"""`python -m casola` is the `casola` command."""

from casola.cli import main

raise SystemExit(main())
