"""``python -m medvlp`` entry point (same as the ``medvlp`` command)."""
from medvlp.cli import main

raise SystemExit(main())
