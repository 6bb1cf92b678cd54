"""The probe's Ray Train per-worker loop: the denoiser's model trained on one cluster's timesteps
alone, its held-out loss on that cluster tracked over training (§3 of Kim et al., ICLR 2025).

Every `probe.eval_every` steps: the ε loss on `probe.heldout_samples` test images, each at a fixed
timestep of the cluster with fixed noise, so the curve measures learning, not sampling noise. At
the end: how many steps the loss took to converge, how far it fell, and the cluster's summed KL
between consecutive forward marginals of a Gaussian fitted to the data (analysis.py).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paceray.protocol import TrialContext
from trainables.difficulty_probe import analysis
from trainables.difficulty_probe.config import Config
from trainables.diffusion.assets import dataset_path
from trainables.diffusion.curriculum import cluster_edges
from trainables.diffusion.data import BatchOrder, ImageBatches, load_split, read_manifest, resize_images, to_unit_range
from trainables.diffusion.diffusion import GaussianDiffusion
from trainables.diffusion.model import build_model, unwrap

CHECKPOINT_FILE = "probe.pt"
HELDOUT = "probe/heldout_loss"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def heldout_batch(data_dir: Path, cfg: Config, lo: int, hi: int):
    """Test images with one fixed timestep in [lo, hi) and fixed noise each (the same on every rank)."""
    images, _ = load_split(data_dir, "test")
    x0 = to_unit_range(resize_images(images[: cfg.probe.heldout_samples], cfg.data.image_size))
    gen = torch.Generator().manual_seed(1234)
    t = torch.randint(lo, hi, (len(x0),), generator=gen)
    return x0, t, torch.randn(x0.shape, generator=gen)


@torch.no_grad()
def heldout_loss(diffusion, model, batch, device, chunk: int = 256) -> float:
    x0, t, noise = batch
    total = 0.0
    for i in range(0, len(x0), chunk):
        part = slice(i, i + chunk)
        losses = diffusion.training_losses(model, x0[part].to(device), t[part].to(device), noise=noise[part].to(device))
        total += float(losses.sum())
    return total / len(x0)


def cluster_kl(data_dir: Path, cfg: Config, diffusion: GaussianDiffusion, edges: list[int]) -> float:
    """Σ_{t in the cluster} D_KL(p_{t−1} ‖ p_t) for a Gaussian fitted to the training images (with
    a ridge of `probe.kl_ridge` on its covariance, so constant pixels keep it finite)."""
    images, _ = load_split(data_dir, "train")
    x = to_unit_range(resize_images(images, cfg.data.image_size)).flatten(1).double().numpy()
    fit = analysis.fit_gaussian(x, ridge=cfg.probe.kl_ridge)
    per_t = analysis.marginal_kl(diffusion.alphas_cumprod.numpy(), fit)
    return analysis.cluster_sums(per_t, edges)[cfg.probe.cluster - 1]


def train_loop(config: dict, context: TrialContext) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config)
    rank, world = _rank_world()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    data_dir = dataset_path(cfg.data, Path(context.storage))
    channels = read_manifest(data_dir)["image_shape"][0]
    images, labels = load_split(data_dir, "train", rank, world)
    batches = ImageBatches(images, labels, cfg.train.batch_size, cfg.data.image_size, device=device,
                           order=BatchOrder(seed=cfg.train.seed, rank=rank))
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    edges = cluster_edges(cfg.diffusion.timesteps, cfg.probe.num_clusters, cfg.probe.clustering, diffusion.log_snr())
    lo, hi = edges[cfg.probe.cluster - 1], edges[cfg.probe.cluster]
    model = build_model(cfg.model.preset, cfg.data.image_size, channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    start, history = 0, []  # history: (step, held-out loss)
    checkpoint = context.checkpoint()  # Ray's latest, or the platform's fallback
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), [tuple(p) for p in state["history"].tolist()]
        batches.seek(start)
    resumable = Resumable(model, optimizer, history)
    train_model = ray.train.torch.prepare_model(model) if world > 1 else model
    heldout = heldout_batch(data_dir, cfg, lo, hi)
    run = context.run_logger() if rank == 0 else None
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
    if run:
        run.set_tags({"probe.bounds": f"[{lo}, {hi})"})
    if start == 0:
        history.append((0, heldout_loss(diffusion, unwrap(model), heldout, device)))
        if run:
            run.log_metrics({HELDOUT: history[-1][1]}, 0)

    for step in range(start + 1, cfg.train.steps + 1):
        x0, _ = next(batches)
        t = torch.randint(lo, hi, (x0.shape[0],), generator=gen).to(device)
        loss = diffusion.training_losses(train_model, x0, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.probe.eval_every == 0 or step == cfg.train.steps:
            history.append((step, heldout_loss(diffusion, unwrap(model), heldout, device)))
            metrics = {"step": step, HELDOUT: history[-1][1]}
            if run:
                run.log_metrics({HELDOUT: history[-1][1], "train/loss": float(loss)}, step)
            if step == cfg.train.steps:
                metrics.update(final_metrics(cfg, history, data_dir, diffusion, edges) if rank == 0 else {})
                if run:
                    run.log_metrics({k: v for k, v in metrics.items() if k.startswith("probe/")}, step)
            _report(metrics, step, resumable, rank, context.checkpoint_dir_name(step))
    if run:
        left = run.close()
        if left and context.console_progress:
            print(left, flush=True)


def final_metrics(cfg: Config, history, data_dir: Path, diffusion, edges) -> dict:
    steps, losses = zip(*history)
    lo, hi = edges[cfg.probe.cluster - 1], edges[cfg.probe.cluster]
    return {
        "probe/convergence_steps": float(analysis.convergence_step(steps, losses, cfg.probe.tolerance,
                                                                   cfg.probe.smoothing)),
        "probe/relative_final_loss": analysis.relative_final_loss(losses, cfg.probe.smoothing),
        "probe/kl": cluster_kl(data_dir, cfg, diffusion, edges),
        "probe/t_lo": float(lo),
        "probe/t_hi": float(hi),
    }


@dataclass(frozen=True)
class Resumable:
    """What a checkpoint holds besides the step: weights, optimizer and the held-out history (the
    loop's own list, appended to as it goes)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    history: list  # (step, held-out loss)


def _report(metrics: dict, step: int, state: Resumable, rank: int, name: str) -> None:
    """Every rank reports (a barrier); rank 0 writes the checkpoint: weights, optimizer, history."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"step": step, "model": unwrap(state.model).state_dict(),
                    "optimizer": state.optimizer.state_dict(),
                    "history": torch.tensor(np.asarray(state.history, dtype=np.float64))}, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
