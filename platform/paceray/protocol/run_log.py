"""What a trainable may do with its trial's run: the run logger's interface. The platform's
tracking layer implements it (paceray.tracking.runlog.RunLogger: every write queued on disk and
delivered in order, so an outage loses nothing); a trainable sees only this."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol


class RunLog(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> bool:
        """Queue `metrics` at `step`; False when every one of them was logged at that step before."""

    def already_logged(self, key: str, step: int) -> bool: ...

    def log_image(self, image, key: str, step: int, belongs_to: Optional[str] = None) -> None: ...

    def log_figure(self, figure, artifact_file: str) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def metric_history(self, key: str) -> list[tuple[int, float]]: ...

    def close(self, timeout: Optional[float] = None) -> Optional[str]:
        """Deliver what is queued; the replay command when some of it must wait for the server."""
