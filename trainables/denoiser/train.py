"""The Ray Train per-worker loop: curriculum-sampled timesteps, weighted ε loss, EMA, FID evals.

A trial trains one config, or several in lockstep (packed arms: paceray.protocol.packing): they
share this worker's data stream, its noise and its FID evaluator; each arm has its own model, EMA,
optimizer, curriculum and run. Reads top to bottom: set-up and resume (`_build`), then one loop
whose body is a step of every live arm on one batch, a log every `train.log_every` steps and an
eval + checkpoint every `eval.every` steps. Rank 0 alone talks to MLflow; every rank samples its
share of the FID images.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from paceray.protocol import ARM_FAILURES_KEY, ARM_STOPPED_KEY, TrialContext, arm_key, arms_of, is_packed, pack_report
from trainables.denoiser.config import Config
from trainables.denoiser.features import fid_evaluator
from trainables.denoiser.reporting import TrialLog, sample_grid
from trainables.denoiser.stacked import StackedArms
from trainables.diffusion import curriculum as curriculum_lib
from trainables.diffusion.assets import dataset_path
from trainables.diffusion.data import BatchOrder, ImageBatches, load_split, read_manifest
from trainables.diffusion.diffusion import GaussianDiffusion, SampleOptions
from trainables.diffusion.draws import StepDraws, initial_seed
from trainables.diffusion.model import EMA, build_model, drop_labels, null_label, unwrap

CHECKPOINT_FILE = "state.pt"
PACK_FILE = "pack.json"  # in a packed trial's checkpoint: its step, and the arms that had ended


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def train_loop(config: dict, context: TrialContext) -> Optional[dict]:
    import ray.train

    trial, restored = _build([Config.model_validate(c) for c in arms_of(config)], context, is_packed(config))
    cfg = trial.cfg
    start_step = restored.step if restored is not None else 0
    if start_step >= cfg.train.steps and restored is not None and restored.metrics is not None:
        # Killed after its last checkpoint but before its caller heard it finished: say the final
        # result again (a Tune trial that reports nothing fails the whole search), then end.
        ray.train.report(restored.metrics)
        trial.finish()
        return trial.returned()

    for step in range(start_step + 1, cfg.train.steps + 1):
        x0, y = next(trial.batches)  # one batch per step serves every arm
        noise = trial.draws.noise(step, x0)  # and one noise tensor: arms share their random numbers
        _step_arms(trial, step, (x0, y, noise))
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            if not _log_interval(trial, step):
                return trial.returned()  # a non-finite loss ended every arm as failed
        if step % cfg.eval.every == 0 or step == cfg.train.steps:
            _eval_and_checkpoint(trial, step)
            if not trial.live:
                break  # the arm scheduler stopped every arm
            trial.restart_clock()  # eval time is not training throughput
    trial.finish()
    return trial.returned()


# ---------------------------------------------------------------- set-up and resume

@dataclass(eq=False)
class _Arm:
    """One arm a worker trains: its config, curriculum, loss weighting, model, EMA and optimizer,
    its run's log (rank 0), what its last step trained on, its last FID and, once its loss is not
    finite, why it failed."""

    key: str
    cfg: Config
    sampler: curriculum_lib.CurriculumSampler
    weights_by_t: torch.Tensor  # the loss weighting w(t) of every timestep, on the device
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    train_model: Optional[torch.nn.Module] = None  # what the step runs: DDP-wrapped and compiled as configured
    log: Optional[TrialLog] = None  # rank 0's
    interval: Optional["_Interval"] = None
    trained: Optional["_Trained"] = None
    last_fid: Optional[float] = None
    failed: Optional[str] = None
    stopped_at: Optional[int] = None  # the step the search's arm scheduler stopped it at

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `train.warmup_steps`, then `train.lr`."""
        warmup = max(1, self.cfg.train.warmup_steps)
        return self.cfg.train.lr * min(1.0, (step + 1) / warmup)

    @property
    def resumable(self) -> Resumable:
        return Resumable(self.model, self.ema, self.optimizer, self.sampler)


@dataclass
class _Trial:
    """One worker's trial, built once (`_build`): where it runs, what its arms share (the data,
    the diffusion, the step's draws, the FID evaluation; `cfg` is the first arm's config, whose
    shared settings every arm has) and its arms."""

    cfg: Config
    context: TrialContext
    rank: int
    world: int
    device: torch.device
    bf16: bool
    num_classes: Optional[int]  # None: unconditional
    batches: ImageBatches
    diffusion: GaussianDiffusion
    evaluator: Any  # fid.FIDEvaluator
    draws: StepDraws  # the step's noise, label dropout and network dropout, keyed by (seed, rank, step)
    packed: bool
    arms: list[_Arm] = field(default_factory=list)
    null: Optional[int] = None  # the label that means "no class" (label dropout); None: unconditional
    # train.pack_compute stacked: the live arms' weights as one stack, and which arms it holds
    stack: Optional[StackedArms] = None
    stacked_arms: list = field(default_factory=list)

    @property
    def live(self) -> list[_Arm]:
        return [arm for arm in self.arms if arm.failed is None and arm.stopped_at is None]

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.cfg, self.diffusion, self.rank, self.world, self.device, self.num_classes, self.bf16)

    def restart_clock(self) -> None:
        for arm in self.live:
            arm.interval.start = time.perf_counter()

    def finish(self) -> None:
        for arm in self.live:
            if arm.log:
                arm.log.finish()

    def returned(self) -> Optional[dict]:
        """What rank 0 returns: a packed trial's arms that failed on their own, and why, and
        those the arm scheduler stopped, and when."""
        stopped = {arm.key: arm.stopped_at for arm in self.arms if arm.stopped_at is not None}
        if not self.packed:  # a trial of one arm fails through its context; it may be stopped
            return {ARM_STOPPED_KEY: stopped} if stopped else None
        return {ARM_FAILURES_KEY: {arm.key: arm.failed for arm in self.arms if arm.failed is not None},
                ARM_STOPPED_KEY: stopped}


@dataclass(frozen=True)
class _Restored:
    """What a resume reads from its checkpoint beside the state it loads."""

    step: int
    world: int  # the worker count that wrote it
    metrics: Optional[dict]  # its report, said again by a resume that finds nothing left to train
    failed: dict = field(default_factory=dict)  # a packed trial's arms that had failed: key -> why
    stopped: dict = field(default_factory=dict)  # and those the arm scheduler had stopped: key -> step


def _build(cfgs: list[Config], context: TrialContext, packed: bool) -> tuple[_Trial, Optional[_Restored]]:
    """The trial, and what its checkpoint (if any) said. The order is the random draws' order:
    seed, data, curriculum, the model's initial weights, the checkpoint's state, then the FID
    evaluator (training a missing FID network reseeds)."""
    import ray.train.torch

    cfg = cfgs[0]
    rank, world = _world()
    device = ray.train.torch.get_device()
    bf16 = _use_precision(cfg, device)
    torch.manual_seed(cfg.train.seed * 1000 + rank)

    storage = Path(context.storage)
    data_dir = dataset_path(cfg.data, storage)
    manifest = read_manifest(data_dir)
    num_classes = manifest["num_classes"] if cfg.data.class_conditional else None
    images, labels = load_split(data_dir, "train", rank, world)
    batches = ImageBatches(images, labels, cfg.train.batch_size, cfg.data.image_size, device=device,
                           order=BatchOrder(seed=cfg.train.seed, rank=rank))
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    trial = _Trial(cfg, context, rank, world, device, bf16, num_classes, batches, diffusion, evaluator=None,
                   draws=StepDraws(cfg.train.seed, rank, device), packed=packed)
    with initial_seed(cfg.train.seed):  # the seed's weights, built once, on every rank
        model = build_model(cfg.model.preset, cfg.data.image_size, manifest["image_shape"][0], num_classes).to(device)
    trial.arms = [_new_arm(trial, arm_key(i), c, model) for i, c in enumerate(cfgs)]
    trial.null = null_label(model)
    checkpoint = context.checkpoint()  # Ray's latest, or the platform's fallback
    restored = _restore(checkpoint, trial) if checkpoint is not None else None
    for arm in trial.live:
        ddp_model = ray.train.torch.prepare_model(arm.model) if world > 1 else arm.model
        arm.train_model = torch.compile(ddp_model) if cfg.train.compile else ddp_model
    trial.evaluator = fid_evaluator(cfg, storage, data_dir, device)
    _open_logs(trial, restored)
    return trial, restored


def _new_arm(trial: _Trial, key: str, cfg: Config, model: torch.nn.Module) -> _Arm:
    """An arm of the trial: its own copy of the seed's initial model (every arm of a seed starts
    from the same weights), its curriculum, loss weighting, EMA and optimizer."""
    import copy

    T = cfg.diffusion.timesteps
    sampler = curriculum_lib.from_config(cfg.curriculum, T, trial.diffusion.log_snr(), trial.rank)
    weights_by_t = trial.diffusion.loss_weight(torch.arange(T), cfg.loss.weighting,
                                               cfg.loss.gamma if cfg.loss.weighting == "min-snr" else cfg.loss.p2_gamma,
                                               cfg.loss.p2_k, cfg.loss.speed_lambda, cfg.loss.speed_tau).to(trial.device)
    model = copy.deepcopy(model)
    ema = EMA(model, decay=cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return _Arm(key, cfg, sampler, weights_by_t, model, ema, optimizer)


def _open_logs(trial: _Trial, restored: Optional[_Restored]) -> None:
    """Each live arm's interval and, on rank 0, its run's log (an arm of a pack logs into its own)."""
    by_key = {arm.key: arm for arm in trial.context.arms}
    for arm in trial.live:
        arm.interval = _Interval.begin(trial, arm)
        if trial.rank != 0:
            continue
        context = trial.context.arm_context(by_key[arm.key]) if arm.key in by_key else trial.context
        arm.log = TrialLog(context, arm.cfg, arm.sampler)
        _note_start(trial, arm, restored)


def _use_precision(cfg: Config, device: torch.device) -> bool:
    """Whether the step runs under bf16 autocast; on CUDA, TF32 matmuls are allowed too."""
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_cuda)


def _restore(checkpoint, trial: _Trial) -> _Restored:
    """Load a checkpoint (written by `report_with_checkpoint`) into the trial's arms and put the
    data stream where the checkpointed run was. A packed trial's checkpoint holds a folder per
    live arm and which arms had failed (those stay failed)."""
    with checkpoint.as_directory() as d:
        if not trial.packed:
            saved = _load_state(Path(d), trial.arms[0].resumable)
            restored = _Restored(step=int(saved["step"]), world=int(saved["world"]), metrics=saved.get("metrics"))
        else:
            pack = json.loads((Path(d) / PACK_FILE).read_text())
            restored = _Restored(step=int(pack["step"]), world=int(pack["world"]), metrics=pack.get("metrics"),
                                 failed=dict(pack.get("failed", {})), stopped=dict(pack.get("stopped", {})))
            for arm in trial.arms:
                arm.failed, arm.stopped_at = restored.failed.get(arm.key), restored.stopped.get(arm.key)
                if arm.failed is None and arm.stopped_at is None:
                    _load_state(Path(d) / arm.key, arm.resumable)
    trial.batches.seek(restored.step)  # the data stream is a function of (seed, rank, step), like the curriculum's
    return restored


def _load_state(folder: Path, state: Resumable) -> dict:
    # weights_only: a checkpoint on a volume every pod can write runs no pickled code on load.
    saved = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    state.model.load_state_dict(saved["model"])
    state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.sampler.load_state_dict(saved["curriculum"])
    return saved


def _note_start(trial: _Trial, arm: _Arm, restored: Optional[_Restored]) -> None:
    """Rank 0's first lines: a fresh arm's curriculum warning, or where a resumed one resumed."""
    log = arm.log
    if restored is None:
        warning = curriculum_lib.degenerate_warning(arm.sampler, arm.cfg.diffusion.schedule)
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
    """An arm's steps since its last log: each cluster's summed raw loss and sample count (on the
    device: no copy per step), the images trained on, and when the interval began."""

    cluster_by_t: torch.Tensor  # the cluster of every timestep, on the device once: no CPU bucketing per step
    loss: torch.Tensor
    count: torch.Tensor
    start: float
    images: int = 0

    @classmethod
    def begin(cls, trial: _Trial, arm: _Arm) -> _Interval:
        n_clusters, device = arm.sampler.num_clusters, trial.device
        cluster_by_t = arm.sampler.cluster_of(torch.arange(arm.cfg.diffusion.timesteps)).to(device)
        return cls(cluster_by_t, torch.zeros(n_clusters, device=device, dtype=torch.float64),
                   torch.zeros(n_clusters, device=device, dtype=torch.float64), time.perf_counter())

    def add(self, t: torch.Tensor, raw: torch.Tensor) -> None:
        k = self.cluster_by_t[t]
        self.loss.index_add_(0, k, raw.double())
        self.count += torch.bincount(k, minlength=len(self.count))

    def restart(self) -> None:
        self.loss.zero_(), self.count.zero_()
        self.start, self.images = time.perf_counter(), 0


def _step_arms(trial: _Trial, step: int, batch: tuple) -> None:
    """One optimizer step of every live arm on the step's batch and noise: one after another (the
    loop), or as one stacked computation (`train.pack_compute: stacked`, stacked.py)."""
    live = trial.live
    if trial.packed and trial.cfg.train.pack_compute == "stacked" and len(live) > 1:
        _stacked_step(trial, live, step, batch)
        return
    for arm in live:
        arm.trained = _train_step(trial, arm, step, batch)


def _train_step(trial: _Trial, arm: _Arm, step: int, batch: tuple) -> _Trained:
    """One optimizer step of one arm on the step's batch and noise, its losses tallied, its
    curriculum advanced. Its timesteps, label dropout and dropout are drawn as its trial alone
    would draw them (keyed by seed, rank and step), whatever arms ran before it."""
    cfg, model, optimizer = arm.cfg, arm.model, arm.optimizer
    x0, y, noise = batch
    for group in optimizer.param_groups:
        group["lr"] = arm.lr_at(step - 1)
    t = _timesteps(trial, arm, step, x0.shape[0])
    y = drop_labels(y, cfg.data.label_dropout, trial.null, trial.draws.labels(step)) if trial.num_classes else None
    trial.draws.seed_dropout(step)
    with torch.autocast(trial.device.type, dtype=torch.bfloat16, enabled=trial.bf16):
        per_sample = trial.diffusion.training_losses(arm.train_model, x0, t, y, noise=noise)
    loss = _weighted(arm, t, per_sample)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    arm.ema.update(model)
    return _tally(arm, t, per_sample.detach(), loss.detach(), x0.shape[0])


def _stacked_step(trial: _Trial, live: list[_Arm], step: int, batch: tuple) -> None:
    """The live arms' step as one vmapped forward and backward over their stacked weights; each
    arm's draws, weighting, clipping and bookkeeping as in `_train_step`."""
    x0, y, noise = batch
    stack = _stack_of(trial, live)
    ts = [_timesteps(trial, arm, step, x0.shape[0]) for arm in live]
    cfg = trial.cfg
    y = drop_labels(y, cfg.data.label_dropout, trial.null, trial.draws.labels(step)) if trial.num_classes else None
    trial.draws.seed_dropout(step)
    x_t = torch.stack([trial.diffusion.q_sample(x0, t, noise) for t in ts])
    with torch.autocast(trial.device.type, dtype=torch.bfloat16, enabled=trial.bf16):
        per_sample = stack.losses(x_t, torch.stack(ts), y, noise)
    losses = torch.stack([_weighted(arm, t, per_sample[k]) for k, (arm, t) in enumerate(zip(live, ts))])
    stack.step(losses, live[0].lr_at(step - 1), cfg.train.grad_clip)
    for k, arm in enumerate(live):
        arm.ema.update(arm.model)
        arm.trained = _tally(arm, ts[k], per_sample[k].detach(), losses[k].detach(), x0.shape[0])


def _stack_of(trial: _Trial, live: list[_Arm]) -> StackedArms:
    """The stack of the live arms, rebuilt when an arm has ended since (its optimizer state kept)."""
    if trial.stack is not None and trial.stacked_arms == live:
        return trial.stack
    if trial.stack is not None:
        trial.stack.store_optimizers([a.optimizer for a in trial.stacked_arms])
        trial.stack.release()
    trial.stack = StackedArms([a.model for a in live], [a.optimizer for a in live], lr=live[0].cfg.train.lr,
                              weight_decay=live[0].cfg.train.weight_decay)
    trial.stacked_arms = list(live)
    return trial.stack


def _timesteps(trial: _Trial, arm: _Arm, step: int, batch_size: int) -> torch.Tensor:
    sampler = arm.sampler
    if arm.log and sampler.stage_index >= sampler.full_index and step == sampler.full_from_step:
        arm.log.full_from(step)
    return sampler.sample(batch_size, trial.device)


def _weighted(arm: _Arm, t: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """The loss the arm's optimizer minimises: its weighting w(t) (times the importance weight of
    a loss-second-moment sampler, which keeps the objective unbiased), averaged."""
    importance = arm.sampler.importance(t)
    weights = arm.weights_by_t[t] if importance is None else arm.weights_by_t[t] * importance
    return (weights * per_sample).mean()


def _tally(arm: _Arm, t: torch.Tensor, raw: torch.Tensor, loss: torch.Tensor, images: int) -> _Trained:
    """A step's losses into the arm's curriculum and interval; its curriculum advanced."""
    sampler = arm.sampler
    sampler.observe(t, raw.float())
    arm.interval.add(t, raw)
    # What this step trained on, before `advance` may open the next stage.
    trained = _Trained(sampler.stage, sampler.t_min, sampler.t_max)
    if sampler.wants_loss:
        sampler.advance(raw.mean() if arm.cfg.curriculum.patience_loss == "raw" else loss)
    else:
        sampler.advance()
    arm.interval.images += images
    return trained


def _log_interval(trial: _Trial, step: int) -> bool:
    """Every live arm's interval to its log, then a fresh interval; an arm whose loss is not finite
    fails (the others go on). False when no arm is left: the trial then ends as failed."""
    live = trial.live
    # Pack-wide: every arm's images, over the interval's wall time (the pack's throughput).
    images = sum(arm.interval.images for arm in live) * trial.world
    elapsed = time.perf_counter() - min(arm.interval.start for arm in live)
    for arm in live:
        _log_arm_interval(trial, arm, step, images / max(elapsed, 1e-9))
    if trial.live:
        return True
    reasons = [f"{arm.key}: {arm.failed}" for arm in trial.arms] if trial.packed else [live[0].failed]
    # Every rank sees the same all-reduced values, so all stop together. Retrying from the last
    # checkpoint would meet the same NaN: a final report ends the trial as failed, with why (every
    # rank reports: it is a barrier), and no exception retries it.
    trial.context.fail("; ".join(reasons) if not trial.packed else "every arm failed: " + "; ".join(reasons),
                       step=step)
    return False


def _log_arm_interval(trial: _Trial, arm: _Arm, step: int, img_per_s: float) -> None:
    interval, trained = arm.interval, arm.trained
    n_clusters = len(interval.loss)
    # One device-to-host copy per log; train/loss is the mean over every sample of the interval.
    totals = _all_reduce_sum(torch.cat([interval.loss, interval.count])).cpu()
    loss_by_cluster, count_by_cluster = totals[:n_clusters], totals[n_clusters:]
    mean_loss = float(loss_by_cluster.sum() / count_by_cluster.sum())
    if not math.isfinite(mean_loss):
        arm.failed = (f"non-finite loss: train/loss is {mean_loss} at step {step} (stage {trained.stage}); "
                      f"lower train.lr or check the data")
        if arm.log:
            arm.log.fail(arm.failed)
        return
    per_cluster = loss_by_cluster / count_by_cluster.clamp(min=1)
    sampled = count_by_cluster > 0
    metrics = {
        "train/loss": mean_loss,
        "curriculum/stage": trained.stage,
        "curriculum/t_min": trained.t_min,
        "curriculum/t_max": trained.t_max,
        "perf/img_per_s": img_per_s,
        "train/lr": arm.lr_at(step - 1),
        "data/batches_drawn": trial.batches.batches_drawn,  # one per step, however many arms share it
        **{f"train/loss_c{i + 1}": float(per_cluster[i]) for i in range(n_clusters) if sampled[i]},
    }
    if arm.log:
        arm.log.metrics(metrics, step, arm.last_fid)
    interval.restart()


def _eval_and_checkpoint(trial: _Trial, step: int) -> None:
    """FID and KID of every live arm's EMA model's samples, logged and reported with one
    checkpoint of the trial (of every live arm, for a pack)."""
    live = trial.live
    if not live:
        return
    eval_start = time.perf_counter()
    scored = evaluate(trial.sampling, [(arm.model, arm.ema) for arm in live], trial.evaluator)
    eval_seconds = time.perf_counter() - eval_start  # the pack's: its arms sample side by side
    by_arm = {}
    for arm, (fid, grid) in zip(live, scored):
        by_arm[arm.key] = {"eval/fid": fid["fid"], "eval/kid": fid["kid"], "eval/seconds": eval_seconds,
                           "step": step, "curriculum/stage": arm.trained.stage, "fid_features": fid["features"],
                           "fid_samples": fid["num_fake"]}
        if not math.isnan(fid["class_accuracy"]):  # a class-conditional model scored by the classifier FID net
            by_arm[arm.key]["eval/class_accuracy"] = fid["class_accuracy"]
        if arm.log:
            arm.log.eval(fid, grid, step, eval_seconds)
        arm.last_fid = fid["fid"]
    _judge_arms(trial, by_arm, step)
    failed = tuple(arm.key for arm in trial.arms if arm.failed is not None)
    metrics = pack_report(by_arm, trial.context.metric, trial.context.mode, failed) if trial.packed \
        else next(iter(by_arm.values()))
    report_with_checkpoint(trial, metrics, step)


def _judge_arms(trial: _Trial, by_arm: dict, step: int) -> None:
    """A packed search's arm scheduler stops arms at its rungs (before the checkpoint, which then
    holds only the arms that go on): rank 0 asks it, every rank hears the answer."""
    judge = trial.context.judge_arms
    if judge is None:
        return
    # a pack's arms by their ids; a trial of one arm (a pack of one) by the trial's
    ids = {arm.key: arm.trial_id for arm in trial.context.arms} or {trial.arms[0].key: trial.context.trial_id}
    stops = None
    if trial.rank == 0:
        answer = judge(step, {ids[k]: float(v[trial.context.metric]) for k, v in by_arm.items()})
        stops = sorted(k for k in by_arm if answer.get(ids[k]))
    if trial.world > 1:
        box = [stops]
        dist.broadcast_object_list(box, src=0)
        stops = box[0]
    for arm in trial.live:
        if arm.key in stops:
            arm.stopped_at = step
            if arm.log:
                arm.log.note(f"stopped by the search's arm scheduler at step {step}")
                arm.log.finish()


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
    """This rank's share of the `eval.fid_samples` images, batch by batch, with the labels they
    were drawn for (None unconditionally); the same noise at every eval (seeded by rank), so FIDs
    over training compare like with like. Sampling runs in the trial's own precision (`bf16`), as
    its training did."""
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
        yield x.float(), y
        done += n


@torch.no_grad()
def evaluate(s: Sampling, arms: list, evaluator) -> list:
    """(FID result, sample grid) of each (model, EMA) in `arms`: every rank samples its share with
    each arm's EMA weights, the arms batch by batch side by side; the statistics are reduced
    across ranks. An arm's images are those it would draw alone (its own generator, seeded as
    alone). On CUDA each round of the arms' batches goes through the FID feature network in one
    pass (`update_together`: features equal up to the network's floating-point reduction order);
    on CPU one pass per arm, which measured faster (benchmarks/feature_pass.py: one pass 1.22×
    the time for 5 arms of the digits classifier, one thread)."""
    from trainables.diffusion.fid import update_together

    evaluators = [evaluator.fork() for _ in arms]
    one_pass = s.device.type == "cuda"
    firsts = None
    with contextlib.ExitStack() as applied:
        ema_models = [applied.enter_context(ema.applied_to(model)) for model, ema in arms]
        for drawn in zip(*(generate_share(s, m) for m in ema_models)):
            batch, labels = [x for x, _ in drawn], [y for _, y in drawn]
            if one_pass:
                update_together(evaluators, batch, labels)
            else:
                for e, x, y in zip(evaluators, batch, labels):
                    e.update(x, y)
            if firsts is None and s.rank == 0:  # the sample grids are rank 0's to log
                firsts = [x[: s.cfg.eval.sample_grid].cpu() for x in batch]
    grids = [sample_grid(x) if s.rank == 0 and s.cfg.eval.sample_grid and firsts is not None else None
             for x in (firsts or [None] * len(arms))]
    return [(e.compute(), grid) for e, grid in zip(evaluators, grids)]


@dataclass(frozen=True)
class Resumable:
    """Everything a checkpoint holds besides the step: model, EMA, optimizer, curriculum."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    sampler: curriculum_lib.CurriculumSampler


def report_with_checkpoint(trial: _Trial, metrics: dict, step: int) -> None:
    """Every rank reports (it is a barrier); rank 0 writes the checkpoint: each live arm's model,
    EMA, optimizer and curriculum, the step and the worker count (the data stream needs nothing
    more: see ImageBatches). A packed trial's holds a folder per live arm (each laid out as an
    unpacked trial's) and PACK_FILE, which names the arms that had failed."""
    import ray.train

    if trial.stack is not None:  # each arm's optimizer state, from the stack's
        trial.stack.store_optimizers([a.optimizer for a in trial.stacked_arms])
    if trial.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for arm in trial.live:
            folder = Path(tmp) / arm.key if trial.packed else Path(tmp)
            folder.mkdir(exist_ok=True)
            torch.save(_state(arm, step, trial.world, metrics), folder / CHECKPOINT_FILE)
        if trial.packed:
            (Path(tmp) / PACK_FILE).write_text(json.dumps(
                {"step": step, "world": trial.world, "metrics": metrics,
                 "failed": {arm.key: arm.failed for arm in trial.arms if arm.failed is not None},
                 "stopped": {arm.key: arm.stopped_at for arm in trial.arms if arm.stopped_at is not None}},
                default=str))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=trial.context.checkpoint_dir_name(step))


def _state(arm: _Arm, step: int, world: int, metrics: dict) -> dict:
    return {
        "step": step,
        "model": unwrap(arm.model).state_dict(),
        "ema": arm.ema.state_dict(),
        "optimizer": arm.optimizer.state_dict(),
        "curriculum": arm.sampler.state_dict(),
        "world": world,
        "metrics": metrics,  # re-reported by a resume that finds nothing left to train
    }
