"""``python -m tandem.bench SUITE ...``."""

from tandem.bench.cli import main

raise SystemExit(main())
