"""The Ray Train per-worker loop: curriculum-sampled timesteps, weighted ε loss, EMA, FID evals.

Reads top to bottom: set-up, resume, then one loop whose body is a training step, a log every
`train.log_every` steps and an eval + checkpoint every `eval.every` steps. Rank 0 alone talks
to MLflow; every rank samples its share of the FID images.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from paceray.protocol import TrialContext
from trainables.denoiser.config import Config
from trainables.denoiser.features import fid_evaluator
from trainables.denoiser.reporting import TrialLog, sample_grid
from trainables.diffusion import curriculum as curriculum_lib
from trainables.diffusion.assets import dataset_path
from trainables.diffusion.data import ImageBatches, load_split, read_manifest
from trainables.diffusion.diffusion import GaussianDiffusion
from trainables.diffusion.model import EMA, build_model, drop_labels, null_label, unwrap

CHECKPOINT_FILE = "state.pt"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def train_loop(config: dict, context: TrialContext) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config)
    rank, world = _world()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_cuda)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.train.seed * 1000 + rank)

    # ---------------------------------------------------------------- data, model, curriculum
    storage = Path(context.storage)
    data_dir = dataset_path(cfg.data, storage)
    manifest = read_manifest(data_dir)
    channels = manifest["image_shape"][0]
    num_classes = manifest["num_classes"] if cfg.data.class_conditional else None
    images, labels = load_split(data_dir, "train", rank, world)
    batches = ImageBatches(images, labels, cfg.train.batch_size, cfg.data.image_size, device=device,
                           seed=cfg.train.seed, rank=rank)
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    sampler = curriculum_lib.from_config(cfg.curriculum, cfg.diffusion.timesteps, diffusion.log_snr(), rank)
    weights_by_t = diffusion.loss_weight(torch.arange(cfg.diffusion.timesteps), cfg.loss.weighting,
                                         cfg.loss.gamma if cfg.loss.weighting == "min-snr" else cfg.loss.p2_gamma,
                                         cfg.loss.p2_k).to(device)

    model = build_model(cfg.model.preset, cfg.data.image_size, channels, num_classes).to(device)
    ema = EMA(model, decay=cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = max(1, cfg.train.warmup_steps)
    lr_at = lambda step: cfg.train.lr * min(1.0, (step + 1) / warmup)  # noqa: E731

    # ---------------------------------------------------------------- resume
    start_step, last_report, saved_world = 0, None, world
    checkpoint = context.checkpoint()  # Ray's latest, or the platform's fallback
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # weights_only: a checkpoint on a volume every pod can write runs no pickled code on load.
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["curriculum"])
        start_step = int(state["step"])
        last_report = state.get("metrics")
        saved_world = int(state["world"])
        batches.seek(start_step)  # the data stream is a function of (seed, rank, step), like the curriculum's
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    train_model = torch.compile(ddp_model) if cfg.train.compile else ddp_model

    evaluator = fid_evaluator(cfg, storage, data_dir, device)
    sampling = Sampling(cfg, diffusion, rank, world, device, num_classes, bf16)
    resumable = Resumable(model, ema, optimizer, sampler)
    log = TrialLog(context, cfg, sampler) if rank == 0 else None
    if log and checkpoint is None:
        warning = curriculum_lib.degenerate_warning(sampler, cfg.diffusion.schedule)
        if warning:
            log.note(f"warning: {warning}")
    if log and checkpoint is not None:
        log.note_resume(start_step)
        if saved_world != world:
            log.note(f"the checkpoint was written by {saved_world} worker(s), this run has {world}: "
                     f"the data is resharded and each worker's data order starts afresh")
    if start_step >= cfg.train.steps and last_report is not None:
        # Killed after its last checkpoint but before its caller heard it finished: say the final
        # result again (a Tune trial that reports nothing fails the whole search), then end.
        ray.train.report(last_report)
        if log:
            log.finish()
        return

    # ---------------------------------------------------------------- the loop
    n_clusters = sampler.num_clusters
    # The cluster of every timestep, on the device once: no CPU bucketing or copy per step.
    cluster_by_t = sampler.cluster_of(torch.arange(cfg.diffusion.timesteps)).to(device)
    cluster_loss = torch.zeros(n_clusters, device=device, dtype=torch.float64)
    cluster_count = torch.zeros(n_clusters, device=device, dtype=torch.float64)
    interval_start, interval_images, last_fid = time.perf_counter(), 0, None
    null = null_label(model)
    label_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank)

    for step in range(start_step + 1, cfg.train.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1)
        x0, y = next(batches)
        if log and sampler.stage_index >= sampler.full_index and step == sampler.full_from_step:
            log.full_from(step)
        t = sampler.sample(x0.shape[0], device)
        y = drop_labels(y, cfg.data.label_dropout, null, label_gen) if num_classes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            per_sample = diffusion.training_losses(train_model, x0, t, y)
        importance = sampler.importance(t)  # loss-second-moment: keeps the objective unbiased
        weights = weights_by_t[t] if importance is None else weights_by_t[t] * importance
        loss = (weights * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        ema.update(model)

        raw = per_sample.detach()
        sampler.observe(t, raw.float())
        k = cluster_by_t[t]
        cluster_loss.index_add_(0, k, raw.double())
        cluster_count += torch.bincount(k, minlength=n_clusters)
        # What this step trained on, before `advance` may open the next stage.
        stage_before, t_lo, t_hi = sampler.stage, sampler.t_min, sampler.t_max
        if sampler.wants_loss:
            sampler.advance(raw.mean() if cfg.curriculum.patience_loss == "raw" else loss.detach())
        else:
            sampler.advance()
        interval_images += x0.shape[0]

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            # One device-to-host copy per log; train/loss is the mean over every sample of the interval.
            totals = _all_reduce_sum(torch.cat([cluster_loss, cluster_count])).cpu()
            loss_by_cluster, count_by_cluster = totals[:n_clusters], totals[n_clusters:]
            mean_loss = float(loss_by_cluster.sum() / count_by_cluster.sum())
            if not math.isfinite(mean_loss):
                # Every rank sees the same all-reduced value, so all stop together. Retrying from
                # the last checkpoint would meet the same NaN: a final report ends the trial as
                # failed, with why (every rank reports: it is a barrier), and no exception retries it.
                reason = (f"non-finite loss: train/loss is {mean_loss} at step {step} (stage {stage_before}); "
                          f"lower train.lr or check the data")
                if log:
                    log.fail(reason)
                context.fail(reason, step=step)
                return
            elapsed = time.perf_counter() - interval_start
            per_cluster = loss_by_cluster / count_by_cluster.clamp(min=1)
            sampled = count_by_cluster > 0
            metrics = {
                "train/loss": mean_loss,
                "curriculum/stage": stage_before,
                "curriculum/t_min": t_lo,
                "curriculum/t_max": t_hi,
                "perf/img_per_s": interval_images * world / max(elapsed, 1e-9),
                "train/lr": lr_at(step - 1),
                **{f"train/loss_c{i + 1}": float(per_cluster[i]) for i in range(n_clusters) if sampled[i]},
            }
            if log:
                log.metrics(metrics, step, last_fid)
            cluster_loss.zero_(), cluster_count.zero_()
            interval_start, interval_images = time.perf_counter(), 0

        if step % cfg.eval.every == 0 or step == cfg.train.steps:
            eval_start = time.perf_counter()
            fid, grid = evaluate(sampling, model, ema, evaluator)
            last_fid = fid["fid"]
            eval_seconds = time.perf_counter() - eval_start
            metrics = {"eval/fid": last_fid, "eval/kid": fid["kid"], "eval/seconds": eval_seconds, "step": step,
                       "curriculum/stage": stage_before, "fid_features": fid["features"],
                       "fid_samples": fid["num_fake"]}
            if log:
                log.eval(fid, grid, step, eval_seconds)
            report_with_checkpoint(resumable, metrics, step, rank, world, context.checkpoint_dir_name(step))
            interval_start = time.perf_counter()  # eval time is not training throughput

    if log:
        log.finish()


@dataclass(frozen=True)
class Sampling:
    """What drawing the FID images needs: the trial's config and diffusion, and where this rank
    runs (its rank, the world size, the device, the class count, the precision)."""

    cfg: Config
    diffusion: GaussianDiffusion
    rank: int
    world: int
    device: torch.device
    num_classes: Optional[int] = None
    bf16: bool = False


@torch.no_grad()
def generate_share(s: Sampling, ema_model):
    """This rank's share of the `eval.fid_samples` images, batch by batch; the same noise at every
    eval (seeded by rank), so FIDs over training compare like with like. Sampling runs in the
    trial's own precision (`bf16`), as its training did."""
    cfg = s.cfg
    share = cfg.eval.fid_samples // s.world + (1 if s.rank < cfg.eval.fid_samples % s.world else 0)
    gen = torch.Generator(device=s.device).manual_seed(10_000 + s.rank)
    shape = (ema_model.config.in_channels, cfg.data.image_size, cfg.data.image_size)
    done = 0
    while done < share:
        n = min(cfg.eval.batch_size, share - done)
        y = torch.randint(s.num_classes, (n,), generator=gen, device=s.device) if s.num_classes else None
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            x = s.diffusion.sample(ema_model, n, shape, cfg.eval.sampler_steps, labels=y,
                                   guidance_scale=cfg.eval.guidance_scale, generator=gen, device=s.device)
        yield x.float()
        done += n


@torch.no_grad()
def evaluate(s: Sampling, model, ema, evaluator):
    """Every rank samples its share with the EMA weights; the FID statistics are reduced across ranks."""
    evaluator.reset()
    first = None
    with ema.applied_to(model) as ema_model:
        for x in generate_share(s, ema_model):
            evaluator.update(x)
            if first is None and s.rank == 0:  # the sample grid is rank 0's to log
                first = x[: s.cfg.eval.sample_grid].cpu()
    result = evaluator.compute()
    return result, (sample_grid(first) if s.rank == 0 and s.cfg.eval.sample_grid and first is not None else None)


@dataclass(frozen=True)
class Resumable:
    """Everything a checkpoint holds besides the step: model, EMA, optimizer, curriculum."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    sampler: curriculum_lib.CurriculumSampler


def report_with_checkpoint(state: Resumable, metrics: dict, step: int, rank: int, world: int, name: str) -> None:
    """Every rank reports (it is a barrier); rank 0 writes the checkpoint: model, EMA, optimizer,
    curriculum, step and the worker count (the data stream needs nothing more: see ImageBatches)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        saved = {
            "step": step,
            "model": unwrap(state.model).state_dict(),
            "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "curriculum": state.sampler.state_dict(),
            "world": world,
            "metrics": metrics,  # re-reported by a resume that finds nothing left to train
        }
        torch.save(saved, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
