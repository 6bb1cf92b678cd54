"""What rank 0 shows: a progress line on the console, metrics/images/plots in the trial's MLflow run."""

from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np
import torch

from paceray.protocol import TrialContext, html_report
from trainables.diffusion.data import from_unit_range


def sample_grid(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> one HxWx3 uint8 grid, as square as possible, 1px gutters."""
    x = from_unit_range(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = torch.full((3, rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


class TrialLog:
    def __init__(self, context: TrialContext, cfg, sampler):
        self.cfg, self.sampler = cfg, sampler
        self.trial = context.trial_id
        self.console = context.console_progress
        self.run = context.run_logger()
        self.fid_features: Optional[str] = None
        self.logged: dict[str, dict[int, float]] = {}  # what this process logged, for the end plot
        self.resumed = False  # only then does the run hold steps this process did not log

    def note_resume(self, step: int) -> None:
        self.resumed = True
        self._say(f"resumed from the checkpoint at step {step} (stage {self.sampler.stage})")

    def note(self, text: str) -> None:
        self._say(text)

    def _say(self, text: str) -> None:
        if self.console:
            # Not print(): Ray Train patches print into its logger, which echoes every line twice.
            sys.stdout.write(f"[{self.trial}] {text}\n")
            sys.stdout.flush()

    def metrics(self, metrics: dict, step: int, last_fid: Optional[float]) -> None:
        for k, v in metrics.items():
            self.logged.setdefault(k, {})[step] = v
        if self.run:
            self.run.log_metrics(metrics, step)
        stages = len(self.sampler.plan)
        fid = f" · FID {last_fid:.2f}" if last_fid is not None else ""
        self._say(f"step {step}/{self.cfg.train.steps} · stage {metrics['curriculum/stage']}/{stages} · "
                  f"t∈[{metrics['curriculum/t_min']}, {metrics['curriculum/t_max']}] · "
                  f"loss {metrics['train/loss']:.4f} · {metrics['perf/img_per_s']:.0f} img/s{fid}")

    def full_from(self, step: int) -> None:
        """Every timestep is active from this step on: logged once, at that step."""
        if self.run:
            self.run.log_metrics({"curriculum/full_from_step": step}, step)
        self._say(f"every timestep is active from step {step}")

    def eval(self, fid: dict, grid, step: int, seconds: float) -> None:
        self.fid_features = f"{fid['features']}; {fid['num_fake']} samples vs {fid['num_real']} reference images"
        if self.run:
            kid = {} if math.isnan(fid["kid"]) else {"eval/kid": fid["kid"], "eval/kid_std": fid["kid_std"]}
            accuracy = fid.get("class_accuracy", math.nan)
            kid.update({} if math.isnan(accuracy) else {"eval/class_accuracy": accuracy})
            self.run.log_metrics({"eval/fid": fid["fid"], **kid, "eval/seconds": seconds}, step)
            if grid is not None:
                self.run.log_image(grid, key="samples", step=step, belongs_to="eval/fid")
            self.run.set_tags({"paceray.fid_features": self.fid_features})
        accuracy = fid.get("class_accuracy", math.nan)
        classified = "" if math.isnan(accuracy) else f", class accuracy {accuracy:.3f}"
        self._say(f"eval at step {step}: FID {fid['fid']:.3f}, KID {fid['kid']:.5f} ± {fid['kid_std']:.5f}{classified} "
                  f"({self.fid_features}; KID subsets of {fid['kid_subset_size']}) in {seconds:.1f}s")

    def fail(self, reason: str) -> None:
        """The trial cannot go on: say so and deliver what is queued. The reason travels in the
        trial's final report (TrialContext.failure); the platform marks the run FAILED with it."""
        self._say(f"FAILED: {reason}")
        self.close()

    def history(self, key: str) -> list[tuple[int, float]]:
        """The run's full history of `key`: what the server has (steps before a resume) and what
        this process logged (perhaps still queued)."""
        merged = dict(self.run.metric_history(key)) if self.run and self.resumed else {}
        merged.update(self.logged.get(key, {}))
        return sorted(merged.items())

    def finish(self) -> None:
        """The schedule (JSON and plot) into the run, then every queued write delivered."""
        if not self.run:
            return
        self.run.log_dict(schedule_json(self.sampler), "curriculum/schedule.json")
        try:
            fig = schedule_figure(self.history, self.sampler)
            if fig is not None:
                self.run.log_figure(fig, "curriculum/schedule.png")
        except Exception as e:  # a picture must never fail a trial that trained to its end
            sys.stderr.write(f"[{self.trial}] warning: curriculum/schedule.png skipped: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}\n")
            sys.stderr.flush()
        self.close()

    def close(self) -> None:
        if self.run:
            left = self.run.close()
            if left:
                self._say(left)


def schedule_json(sampler) -> dict:
    """The curriculum as it ran: clusters, stages (with the per-cluster shares of a `shuffled`
    phase), the step from which every timestep was active, and each finished stage's length, which
    a `shuffled` control under patience pacing reads back (`curriculum.reference`)."""
    return {
        "order": sampler.order_name,
        "clusters": [list(c) for c in sampler.clusters],
        "stages": [{"stage": s.number, "final": s.final, "clusters": list(s.clusters),
                    "ranges": [list(r) for r in s.ranges], "shares": list(s.shares) if s.shares else None}
                   for s in sampler.stages()],
        "full_from_step": sampler.full_from_step,
        "realised_stage_lengths": sampler.realised_lengths(),
    }


def schedule_figure(history, sampler):
    """Stages over steps (with the active timestep band) above the loss of each cluster;
    `history(key)` gives a metric's (step, value) pairs."""
    from matplotlib.figure import Figure

    # The three are logged together, but after a restart during an outage the server may hold
    # a different set of their steps than this process logged: plot the steps all three have.
    series = {k: dict(history(f"curriculum/{k}")) for k in ("stage", "t_min", "t_max")}
    steps = sorted(set(series["stage"]) & set(series["t_min"]) & set(series["t_max"]))
    if not steps:
        return None
    stage = [(s, series["stage"][s]) for s in steps]
    fig = Figure(figsize=(8, 6), constrained_layout=True)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.fill_between(steps, [series["t_min"][s] for s in steps], [series["t_max"][s] for s in steps], step="pre",
                     alpha=0.3, label="active timesteps")
    ax1.set_ylabel("timestep t")
    ax1.set_ylim(0, sampler.timesteps)
    ax1b = ax1.twinx()
    ax1b.step(steps, [v for _, v in stage], where="pre", color="k", label="stage")
    ax1b.set_ylabel("stage")
    ax1.set_title(f"{sampler.order_name} · {sampler.num_clusters} clusters · {sampler.pacing} pacing")
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for k in range(sampler.num_clusters):
        h = history(f"train/loss_c{k + 1}")
        if h:
            ax2.plot([s for s, _ in h], [v for _, v in h], color=cmap(k / max(1, sampler.num_clusters - 1)),
                     label=f"C{k + 1}" if sampler.num_clusters <= 10 or k in (0, sampler.num_clusters - 1) else None)
    html_report.plain_log_scale(ax2, "y")
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss per cluster (C1 hardest)")
    ax2.legend(fontsize="small", ncol=2)
    return fig
