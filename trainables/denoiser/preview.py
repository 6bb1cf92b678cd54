"""`paceray curriculum preview`: the clusters and stages a curriculum will run, before any GPU hour.

Built from the real `CurriculumSampler` (and, with `--sample M`, counts of M timesteps it really
draws in each stage), so what the preview says is what training does.
"""

from __future__ import annotations

from typing import Optional

import torch

from trainables.denoiser.curriculum import CurriculumSampler


def build_sampler(
    timesteps: int,
    clusters: int,
    order: str,
    *,
    clustering: str = "uniform",
    schedule: str = "linear",
    pacing: str = "fixed",
    stage_steps: int = 100,
    patience: int = 200,
    cumulative: bool = True,
    seed: int = 0,
    ranking=None,
) -> CurriculumSampler:
    log_snr = None
    if clustering != "uniform":
        from trainables.denoiser.diffusion import GaussianDiffusion

        log_snr = GaussianDiffusion(timesteps, schedule).log_snr()
    return CurriculumSampler(
        timesteps=timesteps,
        num_clusters=clusters,
        order=order,
        clustering=clustering,
        pacing=pacing,
        stage_steps=stage_steps,
        patience=patience,
        cumulative=cumulative,
        seed=seed,
        log_snr=log_snr,
        ranking=ranking,
    )


def sampled_counts(sampler: CurriculumSampler, stage_index: int, draws: int) -> list[int]:
    """Per-cluster counts of `draws` timesteps from the sampler placed in that stage."""
    probe = CurriculumSampler.__new__(CurriculumSampler)
    probe.__dict__.update(sampler.__dict__)
    probe.generator = torch.Generator().manual_seed(sampler.seed)
    probe.stage_index = stage_index
    probe._refresh()
    t = probe.sample(draws)
    return torch.bincount(probe.cluster_of(t), minlength=sampler.num_clusters).tolist()


def preview(sampler: CurriculumSampler, schedule: str, clustering: str, sample: Optional[int] = None) -> dict:
    stages = []
    schedule_rows = sampler.fixed_schedule()
    for i, (stage, start, end) in enumerate(schedule_rows):
        fixed = sampler.pacing == "fixed"
        row = {
            "stage": stage.number,
            "final": stage.final,
            "start_step": start if fixed else None,
            "end_step": end if fixed else None,
            "clusters": list(stage.clusters),
            "ranges": [list(r) for r in stage.ranges],
            "sampled_counts": sampled_counts(sampler, i, sample) if sample else None,
        }
        stages.append(row)
    if sampler.order_name == "none":  # the baseline has no stages, only the final phase
        stages[-1]["start_step"] = 0 if sampler.pacing == "fixed" else None
    return {
        "timesteps": sampler.timesteps,
        "num_clusters": sampler.num_clusters,
        "order": sampler.order_name,
        "clustering": clustering,
        "schedule": schedule,
        "pacing": sampler.pacing,
        "stage_steps": sampler.stage_steps if sampler.pacing == "fixed" else None,
        "patience": sampler.patience if sampler.pacing == "patience" else None,
        "cumulative": sampler.cumulative,
        "introduction_order": [k + 1 for k in sampler.order],  # 1-based clusters, first introduced first
        "clusters": [list(c) for c in sampler.clusters],
        "stages": stages,
    }


def _cluster_span(ids: list[int], n: int) -> str:
    if not ids:
        return "-"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"C{ids[0]}–C{ids[-1]}"
    return ",".join(f"C{k}" for k in ids)


def render_table(p: dict) -> str:
    n = p["num_clusters"]
    pace = f"fixed, {p['stage_steps']} steps/stage" if p["pacing"] == "fixed" else f"patience τ={p['patience']}"
    lines = [
        f"{n} clusters over t ∈ [0, {p['timesteps']}) · {p['clustering']} clustering · {p['schedule']} schedule",
        f"order {p['order']} · {'cumulative' if p['cumulative'] else 'exclusive'} · {pace}"
        + (f" · clusters introduced {' '.join(f'C{k}' for k in p['introduction_order'])}" if p["introduction_order"] else ""),
        "",
        "cluster  timesteps",
    ]
    for k, (lo, hi) in enumerate(p["clusters"], start=1):
        note = "  (lowest noise, hardest)" if k == 1 else "  (highest noise, easiest)" if k == n and n > 1 else ""
        lines.append(f"C{k:<7} [{lo}, {hi}){note}")
    lines += ["", f"{'stage':<7}{'steps':<16}{'clusters':<14}{'active timesteps':<28}{'sampled per cluster' if p['stages'][0]['sampled_counts'] else ''}"]
    for s in p["stages"]:
        name = "all" if s["final"] else str(s["stage"])
        if s["start_step"] is None:
            steps = "until patience" if not s["final"] else "after the last"
        else:
            steps = f"{s['start_step']}–{s['end_step'] if s['end_step'] is not None else ''}"
        ranges = " ∪ ".join(f"[{lo}, {hi})" for lo, hi in s["ranges"])
        counts = " ".join(str(c) for c in s["sampled_counts"]) if s["sampled_counts"] else ""
        lines.append(f"{name:<7}{steps:<16}{_cluster_span(s['clusters'], n):<14}{ranges:<28}{counts}")
    return "\n".join(lines)
