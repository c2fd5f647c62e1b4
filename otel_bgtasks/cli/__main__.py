"""``python -m otel_bgtasks.cli``: the ``otel-bgtasks`` command, without the console script."""

from otel_bgtasks.cli import main

raise SystemExit(main())
