"""The cluster harness now lives in :mod:`ferry_testing.harness` (shared with bench and demo).

This name stays an alias of that very module, so ``tests.harness`` imports and monkeypatches
(``monkeypatch.setattr(harness, "MemoryBus", ...)``) act on the harness the tests run.
"""

import sys

import ferry_testing.harness

sys.modules[__name__] = ferry_testing.harness
