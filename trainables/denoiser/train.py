"""The Ray Train per-worker loop: curriculum-sampled timesteps, weighted ε loss, EMA, FID evals.

Reads top to bottom: set-up and resume (`_build`), then one loop whose body is a training step,
a log every `train.log_every` steps and an eval + checkpoint every `eval.every` steps. Rank 0
alone talks to MLflow; every rank samples its share of the FID images.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from paceray.protocol import TrialContext
from trainables.denoiser.config import Config
from trainables.denoiser.features import fid_evaluator
from trainables.denoiser.reporting import TrialLog, sample_grid
from trainables.diffusion import curriculum as curriculum_lib
from trainables.diffusion.assets import dataset_path
from trainables.diffusion.data import BatchOrder, ImageBatches, load_split, read_manifest
from trainables.diffusion.diffusion import GaussianDiffusion, SampleOptions
from trainables.diffusion.draws import StepDraws, initial_seed
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

    trial, restored = _build(Config.model_validate(config), context)
    cfg, log = trial.cfg, trial.log
    start_step = restored.step if restored is not None else 0
    if start_step >= cfg.train.steps and restored is not None and restored.metrics is not None:
        # Killed after its last checkpoint but before its caller heard it finished: say the final
        # result again (a Tune trial that reports nothing fails the whole search), then end.
        ray.train.report(restored.metrics)
        if log:
            log.finish()
        return

    interval, last_fid = _Interval.begin(trial), None
    for step in range(start_step + 1, cfg.train.steps + 1):
        trained = _train_step(trial, interval, step)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            if not _log_interval(trial, interval, trained, step, last_fid):
                return  # a non-finite loss ended the trial as failed
        if step % cfg.eval.every == 0 or step == cfg.train.steps:
            last_fid = _eval_and_checkpoint(trial, trained, step)
            interval.start = time.perf_counter()  # eval time is not training throughput
    if log:
        log.finish()


# ---------------------------------------------------------------- set-up and resume

@dataclass(frozen=True)
class _Trial:
    """One worker's trial, built once (`_build`): where it runs, its data, diffusion, curriculum,
    model, EMA and optimizer, the FID evaluation and, on rank 0, its log."""

    cfg: Config
    context: TrialContext
    rank: int
    world: int
    device: torch.device
    bf16: bool
    num_classes: Optional[int]  # None: unconditional
    batches: ImageBatches
    diffusion: GaussianDiffusion
    sampler: curriculum_lib.CurriculumSampler
    weights_by_t: torch.Tensor  # the loss weighting w(t) of every timestep, on the device
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    train_model: torch.nn.Module  # what the step runs: the model, DDP-wrapped and compiled as configured
    evaluator: Any  # fid.FIDEvaluator
    log: Optional[TrialLog]  # rank 0's
    null: Optional[int]  # the label that means "no class" (label dropout); None: unconditional
    draws: StepDraws  # the step's noise, label dropout and network dropout, keyed by (seed, rank, step)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `train.warmup_steps`, then `train.lr`."""
        warmup = max(1, self.cfg.train.warmup_steps)
        return self.cfg.train.lr * min(1.0, (step + 1) / warmup)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.cfg, self.diffusion, self.rank, self.world, self.device, self.num_classes, self.bf16)

    @property
    def resumable(self) -> Resumable:
        return Resumable(self.model, self.ema, self.optimizer, self.sampler)


@dataclass(frozen=True)
class _Restored:
    """What a resume reads from its checkpoint beside the state it loads."""

    step: int
    world: int  # the worker count that wrote it
    metrics: Optional[dict]  # its report, said again by a resume that finds nothing left to train


def _build(cfg: Config, context: TrialContext) -> tuple[_Trial, Optional[_Restored]]:
    """The trial, and what its checkpoint (if any) said. The order is the random draws' order:
    seed, data, curriculum, the model's initial weights, the checkpoint's state, then the FID
    evaluator (training a missing FID network reseeds)."""
    import ray.train.torch

    rank, world = _world()
    device = ray.train.torch.get_device()
    bf16 = _use_precision(cfg, device)
    torch.manual_seed(cfg.train.seed * 1000 + rank)

    storage = Path(context.storage)
    data_dir = dataset_path(cfg.data, storage)
    manifest = read_manifest(data_dir)
    channels = manifest["image_shape"][0]
    num_classes = manifest["num_classes"] if cfg.data.class_conditional else None
    images, labels = load_split(data_dir, "train", rank, world)
    batches = ImageBatches(images, labels, cfg.train.batch_size, cfg.data.image_size, device=device,
                           order=BatchOrder(seed=cfg.train.seed, rank=rank))
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    sampler = curriculum_lib.from_config(cfg.curriculum, cfg.diffusion.timesteps, diffusion.log_snr(), rank)
    weights_by_t = diffusion.loss_weight(torch.arange(cfg.diffusion.timesteps), cfg.loss.weighting,
                                         cfg.loss.gamma if cfg.loss.weighting == "min-snr" else cfg.loss.p2_gamma,
                                         cfg.loss.p2_k).to(device)

    with initial_seed(cfg.train.seed):  # the seed's weights, on every rank (and every arm of the seed)
        model = build_model(cfg.model.preset, cfg.data.image_size, channels, num_classes).to(device)
    ema = EMA(model, decay=cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    checkpoint = context.checkpoint()  # Ray's latest, or the platform's fallback
    restored = None
    if checkpoint is not None:
        restored = _restore(checkpoint, Resumable(model, ema, optimizer, sampler), batches)
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    train_model = torch.compile(ddp_model) if cfg.train.compile else ddp_model

    evaluator = fid_evaluator(cfg, storage, data_dir, device)
    log = TrialLog(context, cfg, sampler) if rank == 0 else None
    trial = _Trial(cfg, context, rank, world, device, bf16, num_classes, batches, diffusion, sampler, weights_by_t,
                  model, ema, optimizer, train_model, evaluator, log, null=null_label(model),
                  draws=StepDraws(cfg.train.seed, rank, device))
    if log:
        _note_start(trial, restored)
    return trial, restored


def _use_precision(cfg: Config, device: torch.device) -> bool:
    """Whether the step runs under bf16 autocast; on CUDA, TF32 matmuls are allowed too."""
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_cuda)


def _restore(checkpoint, state: Resumable, batches: ImageBatches) -> _Restored:
    """Load a checkpoint (written by `report_with_checkpoint`) into `state` and put the data
    stream where the checkpointed run was."""
    with checkpoint.as_directory() as d:
        # weights_only: a checkpoint on a volume every pod can write runs no pickled code on load.
        saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    state.model.load_state_dict(saved["model"])
    state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.sampler.load_state_dict(saved["curriculum"])
    restored = _Restored(step=int(saved["step"]), world=int(saved["world"]), metrics=saved.get("metrics"))
    batches.seek(restored.step)  # the data stream is a function of (seed, rank, step), like the curriculum's
    return restored


def _note_start(trial: _Trial, restored: Optional[_Restored]) -> None:
    """Rank 0's first lines: a fresh trial's curriculum warning, or where a resumed one resumed."""
    log = trial.log
    if restored is None:
        warning = curriculum_lib.degenerate_warning(trial.sampler, trial.cfg.diffusion.schedule)
        if warning:
            log.note(f"warning: {warning}")
        return
    log.note_resume(restored.step)
    if restored.world != trial.world:
        log.note(f"the checkpoint was written by {restored.world} worker(s), this run has {trial.world}: "
                 f"the data is resharded and each worker's data order starts afresh")


# ---------------------------------------------------------------- a step, a log, an eval

@dataclass(frozen=True)
class _Trained:
    """What a step trained on, read before `advance` may open the next stage."""

    stage: int
    t_min: int
    t_max: int


@dataclass
class _Interval:
    """The steps since the last log: each cluster's summed raw loss and sample count (on the
    device: no copy per step), the images trained on, and when the interval began."""

    cluster_by_t: torch.Tensor  # the cluster of every timestep, on the device once: no CPU bucketing per step
    loss: torch.Tensor
    count: torch.Tensor
    start: float
    images: int = 0

    @classmethod
    def begin(cls, trial: _Trial) -> _Interval:
        n_clusters, device = trial.sampler.num_clusters, trial.device
        cluster_by_t = trial.sampler.cluster_of(torch.arange(trial.cfg.diffusion.timesteps)).to(device)
        return cls(cluster_by_t, torch.zeros(n_clusters, device=device, dtype=torch.float64),
                   torch.zeros(n_clusters, device=device, dtype=torch.float64), time.perf_counter())

    def add(self, t: torch.Tensor, raw: torch.Tensor) -> None:
        k = self.cluster_by_t[t]
        self.loss.index_add_(0, k, raw.double())
        self.count += torch.bincount(k, minlength=len(self.count))

    def restart(self) -> None:
        self.loss.zero_(), self.count.zero_()
        self.start, self.images = time.perf_counter(), 0


def _train_step(trial: _Trial, interval: _Interval, step: int) -> _Trained:
    """One optimizer step on a batch, its losses tallied, the curriculum advanced."""
    cfg, sampler, model, optimizer = trial.cfg, trial.sampler, trial.model, trial.optimizer
    for group in optimizer.param_groups:
        group["lr"] = trial.lr_at(step - 1)
    x0, y = next(trial.batches)
    if trial.log and sampler.stage_index >= sampler.full_index and step == sampler.full_from_step:
        trial.log.full_from(step)
    t = sampler.sample(x0.shape[0], trial.device)
    y = drop_labels(y, cfg.data.label_dropout, trial.null, trial.draws.labels(step)) if trial.num_classes else None
    noise = trial.draws.noise(step, x0)
    trial.draws.seed_dropout(step)
    with torch.autocast(trial.device.type, dtype=torch.bfloat16, enabled=trial.bf16):
        per_sample = trial.diffusion.training_losses(trial.train_model, x0, t, y, noise=noise)
    importance = sampler.importance(t)  # loss-second-moment: keeps the objective unbiased
    weights = trial.weights_by_t[t] if importance is None else trial.weights_by_t[t] * importance
    loss = (weights * per_sample).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    trial.ema.update(model)

    raw = per_sample.detach()
    sampler.observe(t, raw.float())
    interval.add(t, raw)
    # What this step trained on, before `advance` may open the next stage.
    trained = _Trained(sampler.stage, sampler.t_min, sampler.t_max)
    if sampler.wants_loss:
        sampler.advance(raw.mean() if cfg.curriculum.patience_loss == "raw" else loss.detach())
    else:
        sampler.advance()
    interval.images += x0.shape[0]
    return trained


def _log_interval(trial: _Trial, interval: _Interval, trained: _Trained, step: int,
                  last_fid: Optional[float]) -> bool:
    """The interval's metrics to rank 0's log, then a fresh interval; False (the trial then ends
    as failed) when its loss is not finite."""
    n_clusters = len(interval.loss)
    # One device-to-host copy per log; train/loss is the mean over every sample of the interval.
    totals = _all_reduce_sum(torch.cat([interval.loss, interval.count])).cpu()
    loss_by_cluster, count_by_cluster = totals[:n_clusters], totals[n_clusters:]
    mean_loss = float(loss_by_cluster.sum() / count_by_cluster.sum())
    if not math.isfinite(mean_loss):
        # Every rank sees the same all-reduced value, so all stop together. Retrying from
        # the last checkpoint would meet the same NaN: a final report ends the trial as
        # failed, with why (every rank reports: it is a barrier), and no exception retries it.
        reason = (f"non-finite loss: train/loss is {mean_loss} at step {step} (stage {trained.stage}); "
                  f"lower train.lr or check the data")
        if trial.log:
            trial.log.fail(reason)
        trial.context.fail(reason, step=step)
        return False
    elapsed = time.perf_counter() - interval.start
    per_cluster = loss_by_cluster / count_by_cluster.clamp(min=1)
    sampled = count_by_cluster > 0
    metrics = {
        "train/loss": mean_loss,
        "curriculum/stage": trained.stage,
        "curriculum/t_min": trained.t_min,
        "curriculum/t_max": trained.t_max,
        "perf/img_per_s": interval.images * trial.world / max(elapsed, 1e-9),
        "train/lr": trial.lr_at(step - 1),
        **{f"train/loss_c{i + 1}": float(per_cluster[i]) for i in range(n_clusters) if sampled[i]},
    }
    if trial.log:
        trial.log.metrics(metrics, step, last_fid)
    interval.restart()
    return True


def _eval_and_checkpoint(trial: _Trial, trained: _Trained, step: int) -> float:
    """FID and KID of the EMA model's samples, logged and reported with a checkpoint; returns the FID."""
    eval_start = time.perf_counter()
    fid, grid = evaluate(trial.sampling, trial.model, trial.ema, trial.evaluator)
    eval_seconds = time.perf_counter() - eval_start
    metrics = {"eval/fid": fid["fid"], "eval/kid": fid["kid"], "eval/seconds": eval_seconds, "step": step,
               "curriculum/stage": trained.stage, "fid_features": fid["features"],
               "fid_samples": fid["num_fake"]}
    if trial.log:
        trial.log.eval(fid, grid, step, eval_seconds)
    report_with_checkpoint(trial.resumable, metrics, step, trial.rank, trial.world,
                           trial.context.checkpoint_dir_name(step))
    return fid["fid"]


# ---------------------------------------------------------------- sampling and checkpoints

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
            x = s.diffusion.sample(ema_model, n, shape, cfg.eval.sampler_steps,
                                   SampleOptions(labels=y, guidance_scale=cfg.eval.guidance_scale, generator=gen,
                                                 device=s.device))
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
