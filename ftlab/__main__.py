"""`python -m ftlab ...` runs the `ftlab` command."""
from ftlab.cli import main

raise SystemExit(main())
