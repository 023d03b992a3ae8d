"""``python -m ferry_common.signing``: the key CLI (:mod:`.cli`)."""

from .cli import main

raise SystemExit(main())
