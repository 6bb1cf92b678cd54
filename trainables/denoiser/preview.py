"""`paceray curriculum preview`: the clusters and stages a curriculum will run, before any GPU hour.

Built from the real `CurriculumSampler` (and, with `--sample M`, counts of M timesteps it really
draws in each stage), so what the preview says is what training does.
"""

from __future__ import annotations

from typing import Optional

import torch

from trainables.diffusion.config import CurriculumConfig
from trainables.diffusion.curriculum import CurriculumSampler, SamplerInputs, degenerate_warning

DISTRIBUTION_NOTES = {
    "logit-normal": "t = ⌊sigmoid(m + s·z)·T⌋ (SD3), renormalised over each stage's active timesteps",
    "speed": ("SpeeD: p(t) ∝ k below τ·T and 1 above, each draw mirrored about the schedule's meaningful "
              "step m (drawn i.i.d. from that marginal), renormalised over each stage's active timesteps"),
    "loss-second-moment": ("uniform until every active t has 10 squared losses (the counts below are that "
                           "warm-up), then p(t) ∝ sqrt(E[loss²]) with 0.1% uniform, the loss weighted by "
                           "1/(|active|·p(t))"),
}
QUANTILE_NOTE = ("quantile: EDM's continuous training distribution of ln σ mapped onto discrete t, "
                 "not the paper's discrete-time setting (which is `uniform`)")


def build_sampler(config: CurriculumConfig, timesteps: int, schedule: str = "linear",
                  inputs: Optional[SamplerInputs] = None) -> CurriculumSampler:
    """The sampler a trial with this curriculum, T and schedule would train with."""
    log_snr = None
    if config.clustering != "uniform" or config.distribution == "speed":
        from trainables.diffusion.diffusion import GaussianDiffusion

        log_snr = GaussianDiffusion(timesteps, schedule).log_snr()
    return CurriculumSampler(config, timesteps, log_snr=log_snr, inputs=inputs)


def sampled_counts(sampler: CurriculumSampler, stage_index: int, draws: int) -> list[int]:
    """Per-cluster counts of `draws` timesteps from the sampler placed in that stage."""
    probe = CurriculumSampler.__new__(CurriculumSampler)
    probe.__dict__.update(sampler.__dict__)
    probe.generator = torch.Generator().manual_seed(sampler.config.seed)
    probe.stage_index = stage_index
    probe._refresh()
    t = probe.sample(draws)
    return torch.bincount(probe.cluster_of(t), minlength=sampler.num_clusters).tolist()


def preview(sampler: CurriculumSampler, schedule: str, sample: Optional[int] = None) -> dict:
    stages = []
    for i, (stage, start, end) in enumerate(sampler.fixed_schedule()):
        stages.append({
            "stage": stage.number,
            "final": stage.final,
            "start_step": start,
            "end_step": end,
            "clusters": list(stage.clusters),
            "ranges": [list(r) for r in stage.ranges],
            "shares": list(stage.shares) if stage.shares else None,
            "sampled_counts": sampled_counts(sampler, i, sample) if sample else None,
        })
    cfg, patience = sampler.config, sampler.pacing == "patience"
    return {
        "timesteps": sampler.timesteps,
        "num_clusters": sampler.num_clusters,
        "order": sampler.order_name,
        "clustering": sampler.clustering,
        "schedule": schedule,
        "pacing": sampler.pacing,
        "stage_steps": cfg.stage_steps if not patience else None,
        "patience": cfg.patience if patience else None,
        "max_stage_steps": cfg.max_stage_steps if patience else None,
        "cumulative": sampler.cumulative,
        "introduction_order": [k + 1 for k in sampler.order],  # 1-based clusters, first introduced first
        "clusters": [list(c) for c in sampler.clusters],
        "stages": stages,
        # The first training step (1-based) on all timesteps; under patience the latest it can be.
        "full_from_step": sampler.full_from_step,
        "latest_full_from_step": sampler.latest_full_from_step,
        "distribution": sampler.distribution.name,
        "distribution_note": DISTRIBUTION_NOTES.get(sampler.distribution.name),
        "warning": degenerate_warning(sampler, schedule),
        "note": QUANTILE_NOTE if sampler.clustering == "quantile" else None,
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
    if p["pacing"] == "patience":
        pace += f", at most {p['max_stage_steps']} steps/stage" if p["max_stage_steps"] else ", stages uncapped"
    if p["full_from_step"] is not None:
        full = f"every timestep active from step {p['full_from_step']}"
    elif p["latest_full_from_step"] is not None:
        full = f"every timestep active from step {p['latest_full_from_step']} at the latest (patience decides)"
    else:
        full = "every timestep active once patience has ended every stage (no cap: max_stage_steps)"
    lines = [
        f"{n} clusters over t ∈ [0, {p['timesteps']}) · {p['clustering']} clustering · {p['schedule']} schedule",
        f"order {p['order']} · {'cumulative' if p['cumulative'] else 'exclusive'} · {pace}"
        + (f" · clusters introduced {' '.join(f'C{k}' for k in p['introduction_order'])}" if p["introduction_order"] else ""),
        full,
        f"t drawn {p['distribution']} within the active timesteps"
        + (f": {p['distribution_note']}" if p["distribution_note"] else ""),
        *([p["note"]] if p["note"] else []),
        "",
        "cluster  timesteps",
    ]
    for k, (lo, hi) in enumerate(p["clusters"], start=1):
        note = "  (lowest noise, hardest)" if k == 1 else "  (highest noise, easiest)" if k == n and n > 1 else ""
        lines.append(f"C{k:<7} [{lo}, {hi}){note}")
    lines += ["", f"{'stage':<9}{'steps':<16}{'clusters':<14}{'active timesteps':<28}{'sampled per cluster' if p['stages'][0]['sampled_counts'] else ''}"]
    for s in p["stages"]:
        name = f"{s['stage']} all" if s["final"] else str(s["stage"])
        if s["start_step"] is None:
            steps = "after the last"
        elif s["end_step"] is None and not s["final"]:
            steps = f"{s['start_step']}–patience"
        else:
            steps = f"{s['start_step']}–{s['end_step'] if s['end_step'] is not None else ''}"
        ranges = " ∪ ".join(f"[{lo}, {hi})" for lo, hi in s["ranges"])
        if s["shares"]:
            ranges = "shuffled: " + " ".join(f"C{k + 1} {v:.1%}" for k, v in enumerate(s["shares"]))
        counts = " ".join(str(c) for c in s["sampled_counts"]) if s["sampled_counts"] else ""
        lines.append(f"{name:<9}{steps:<16}{_cluster_span(s['clusters'], n):<14}{ranges:<27} {counts}")
    return "\n".join(lines)
