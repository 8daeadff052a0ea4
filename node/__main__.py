"""``python -m node`` is the ``chapar`` command."""

from node.cli import main

raise SystemExit(main())
