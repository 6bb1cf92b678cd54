"""System metrics of a trial: this node's CPU, memory, disk, network and, where nvidia-ml-py sees a
GPU, each GPU's utilisation and memory, sampled by MLflow's own monitors on rank 0's node.

MLflow's `SystemMetricsMonitor` logs straight to the server and stops at the first failed call,
so an outage would end the series for good. Here the same monitors are sampled, and each sample is
queued through the run's spool like every other write (paceray.tracking.runlog): an outage loses none and
blocks nothing. Names are MLflow's, under `system/` (the UI's "System metrics" section); the step
is the sample's index, continued after the run's last sample across restarts.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional

PREFIX = "system/"
INTERVAL_ENV = "PACERAY_SYSTEM_METRICS_INTERVAL"  # seconds between samples; 0 turns sampling off
DEFAULT_INTERVAL = 10.0  # MLflow's own default


def interval() -> float:
    raw = os.environ.get(INTERVAL_ENV) or os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    return float(raw) if raw else DEFAULT_INTERVAL


def monitors() -> list:
    """MLflow's monitors that work on this node: CPU/memory, disk and network always; NVIDIA
    GPUs with nvidia-ml-py installed (`.[gpu]`), AMD GPUs with pyrsmi; neither is an error."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            found.append(gpu())
            break
        except Exception:  # no library, no device, or no driver: no GPU series
            continue
    return found


class SystemSampler:
    """A daemon thread sampling `monitors()` every `every` seconds into `log(metrics, step)` (a
    run logger's log_metrics), and once more at stop, so even a short trial has a sample. Steps
    count from `first_step`: after the run's last sample (a restarted worker's run already has
    some), since the run logger drops a sample at a step the run has."""

    def __init__(self, log: Callable[[dict[str, float], int], Any], first_step: int = 0,
                 every: Optional[float] = None):
        self.log = log
        self.every = interval() if every is None else every
        self.monitors = monitors()
        self.step = first_step
        # psutil's CPU figure is the load since its previous call: the first would read 0.
        self._collect()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _collect(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
            except Exception:  # one monitor's hiccup (a GPU gone away) must not end the others
                pass
            finally:
                monitor.clear_metrics()
        return values

    def sample(self) -> None:
        values = self._collect()
        if values:
            self.log({PREFIX + k: v for k, v in values.items()}, self.step)
            self.step += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=30)
            self.sample()
