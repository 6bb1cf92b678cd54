"""Every key and tag the platform writes or reads: in reports, in a trial's return value, on MLflow
runs and experiments. One place, so that a tag is renamed or added in one edit; trainables read
the ones they need (a report hook reads the trial id, the error, the best trial) from here too."""

from __future__ import annotations

ENTRY_POINT_GROUP = "paceray.trainables"  # the entry-point group trainables register under

# ------------------------------------------------------------------ in a trial's reports
STEP_KEY = "step"  # every report carries its progress under this key (the scheduler's time axis)
FAILURE_KEY = "paceray.failure"  # a final report carrying it ends the trial as failed, its value the reason
PLACEMENT_KEY = "paceray_placement"  # in rank 0's return value: where each rank ran
CHECKPOINT_PREFIX = "checkpoint_step"  # a checkpoint's folder name: the prefix and its step

# ------------------------------------------------------------------ on a trial's run
TRIAL_TAG = "paceray.trial_id"
ERROR_TAG = "paceray.error"  # why a trial failed
STOPPED_TAG = "paceray.stopped_early"  # who stopped it before its last step (a scheduler)
PLACEMENT_TAG = "paceray.placement"  # where its ranks ran, as JSON
NODES_TAG = "paceray.nodes"  # how many nodes its ranks ran on
# Which arm of the search a trial is, in the trainable's words (Trainable.arm_label): its
# settings of the paths the search varies, the seed aside; runs of one arm over seeds share it.
ARM_TAG = "paceray.arm"
PACK_TAG = "paceray.pack"  # on an arm of a packed trial: the Tune trial id of its pack
# On an arm of a packed trial: the metrics measured for the whole pack, not the arm (perf/img_per_s
# counts every arm's images; system/* is the pack's node).
PACK_WIDE_TAG = "paceray.pack_wide_metrics"

# ------------------------------------------------------------------ on every run the platform makes
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting of a trial's run under its search's
KIND_TAG = "paceray.kind"  # "search" or "trial"
TRAINABLE_TAG = "paceray.trainable"  # which trainable's hooks read the runs back
METRIC_TAG = "paceray.metric"  # the search metric and its mode, for reports without the spec
MODE_TAG = "paceray.mode"

# ------------------------------------------------------------------ on a search's parent run
SPEC_TAG = "paceray.spec"  # the spec file the search was started from
BEST_TRIAL_TAG = "paceray.best_trial"  # set from the report
BEST_CHECKPOINT_TAG = "paceray.best_checkpoint"  # the checkpoint the best model was exported from
MODEL_VERSION_TAG = "paceray.model_version"  # "NAME/VERSION", so a resumed search registers once
VIEW_TAG = "paceray.ui_view"  # the key of the search's shared view in MLflow's UI

# ------------------------------------------------------------------ on the experiment
# MLflow 3's UI opens an experiment without this tag on its GenAI overview, not on its runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
