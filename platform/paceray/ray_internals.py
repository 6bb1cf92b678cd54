"""The one place paceray reads a Ray internal, because no public API says it (Ray 2.60).

- Inside a Tune function trainable, whether Tune itself is stopping this trial (a scheduler's
  decision): Tune then kills the trial's process, and its TorchTrainer's death is not a trial
  failure. Tune's session keeps that as a `threading.Event` called `stop_event`.

tests/test_ray_internals.py fails loudly when Ray moves it.
"""

from __future__ import annotations

import threading
from typing import Optional


def tune_stop_flag() -> Optional[threading.Event]:
    """The event Tune sets when it stops this trial; None outside a Tune trial."""
    from ray.train._internal.session import get_session

    session = get_session()
    return None if session is None else session.stop_event
