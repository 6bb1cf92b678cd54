"""What a trial's rank 0 writes to its MLflow run: metrics by step, images, figures, tags.

The run is created by the platform (one per trial, its id kept across restarts); the trainable
only logs into it. A restarted worker re-trains the steps after its last checkpoint: steps
already in the run are not logged a second time, so the history stays one line per metric.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any, Mapping, Optional


class RunLogger:
    def __init__(self, run_id: str, tracking_uri: Optional[str] = None):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.logged_through = self._last_logged_step()

    def _last_logged_step(self) -> int:
        """Highest step of any metric already in the run (-1 for a fresh run)."""
        run = self.client.get_run(self.run_id)
        last = -1
        for key in run.data.metrics:
            for m in self.client.get_metric_history(self.run_id, key):
                last = max(last, m.step)
        return last

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> bool:
        """Log a row of metrics at `step`; False (and nothing written) if the run already has it."""
        if step <= self.logged_through:
            return False
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=rows)
        return True

    def log_image(self, image, key: str, step: int) -> None:
        """A step-indexed image (the UI's image grid); `image` is a PIL image or HxWxC uint8 array."""
        if step <= self.logged_through:
            return
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact_dir(self, local_dir: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))
