"""The chaos run's short seed, in the soak mode (``make chaos`` runs long ones): 20 migrations, four at a time, while
random faults strike (a broker restart among them: it runs last), then every invariant is checked; the
table joins the fault suite's. About a minute on 2 cores."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.faults.chaos import chaos_run
from tests.faults.report import RESULTS

# soak only (make soak, make chaos): the seed passes about 9 runs in 10 here; the tenth hangs
# in the final check after a broker restart (a request/reply path not restored: open)
pytestmark = [pytest.mark.rabbitmq, pytest.mark.broker_restart,
              pytest.mark.skipif(os.environ.get("FERRY_SOAK") != "1", reason="chaos runs with FERRY_SOAK=1 (make soak, make chaos)")]
SEED = int(os.environ.get("FERRY_CHAOS_SEED", "20261201"))
BOUND_S = 420.0


async def test_chaos_short_seed(rabbitmq_available: None) -> None:
    # bounded: a run that hangs fails CI in minutes, not at the job's limit
    rec = await asyncio.wait_for(chaos_run(SEED, migrations=20, concurrency=4, pause_s=(0.5, 2.0)), BOUND_S)
    RESULTS.cases.extend(rec.cases)
    assert len([c for c in rec.cases if c.kind != "limits"]) == 20
    assert any(c.kind != "none" for c in rec.cases), "no fault struck: the run proves nothing"
    assert rec.violations() == 0, rec.render()
