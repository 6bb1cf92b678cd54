"""The protocol layer: everything a trainable may import from the platform, and nothing else.

It owns the `Trainable` declaration and the `TrialContext` a trial is told (trainable.py), every
key and tag the platform writes or reads (keys.py), the run logger's interface (run_log.py), the
report hook's types (report_hook.py) and the parts of report.html (html.py); and it re-exports the
few `base` helpers a trainable uses (the user error, atomic writes, the storage root and its lock,
progress bars). It may import only `paceray.base`, and `ray.train` for a trial's reports and
checkpoints; importing it imports no torch, Ray or MLflow.
"""

from paceray.base.atomic import write_atomic, write_text_atomic
from paceray.base.console import progress_bar
from paceray.base.errors import PacerayError, one_line
from paceray.base.locks import held as storage_lock
from paceray.base.paths import storage_root
from paceray.protocol import html as html_report
from paceray.protocol.keys import (
                                   ARM_TAG,
                                   BEST_TRIAL_TAG,
                                   CHECKPOINT_PREFIX,
                                   ENTRY_POINT_GROUP,
                                   ERROR_TAG,
                                   FAILURE_KEY,
                                   STEP_KEY,
                                   TRIAL_TAG,
)
from paceray.protocol.packing import (
                                   ARM_FAILURES_KEY,
                                   ARM_STOPPED_KEY,
                                   Arm,
                                   Packing,
                                   arm_key,
                                   arms_of,
                                   is_packed,
                                   pack_report,
)
from paceray.protocol.run_log import RunLog
from paceray.protocol.trainable import (
                                   CheckpointFallback,
                                   Horizon,
                                   PrepareContext,
                                   Trainable,
                                   TrialContext,
                                   default_arm_label,
                                   default_run_name,
                                   failure_of,
)

__all__ = ["ARM_FAILURES_KEY", "ARM_STOPPED_KEY", "Arm", "Packing", "arm_key", "arms_of", "is_packed", "pack_report",
           "ARM_TAG", "BEST_TRIAL_TAG", "CHECKPOINT_PREFIX", "ENTRY_POINT_GROUP", "ERROR_TAG", "FAILURE_KEY", "STEP_KEY",
           "TRIAL_TAG", "CheckpointFallback", "Horizon", "PacerayError", "PrepareContext", "RunLog", "Trainable",
           "TrialContext", "default_arm_label", "default_run_name", "failure_of", "html_report", "one_line", "progress_bar",
           "storage_lock", "storage_root", "write_atomic", "write_text_atomic"]
