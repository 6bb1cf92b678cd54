"""The denoiser's own CLI tools, mounted under `paceray`: curriculum preview, data prepare,
fid-net train. Only click is imported here; each command loads torch when it runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trainables.diffusion.config import Clustering, Dataset, Order


def _choices(literal) -> click.Choice:
    return click.Choice(list(literal.__args__))


@click.group()
def curriculum() -> None:
    """Inspect timestep curricula."""


@curriculum.command()
@click.option("--timesteps", "-T", type=click.IntRange(2, 100_000), default=1000, show_default=True)
@click.option("--clusters", "-N", type=click.IntRange(1), default=20, show_default=True)
@click.option("--order", type=_choices(Order), default="easy-to-hard", show_default=True)
@click.option("--clustering", type=_choices(Clustering), default="uniform", show_default=True)
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True,
              help="Noise schedule (log-snr and quantile clustering depend on it). linear: DDPM's β 1e-4 → 0.02.")
@click.option("--pacing", type=click.Choice(["fixed", "patience"]), default="fixed", show_default=True)
@click.option("--stage-steps", type=click.IntRange(1), default=100, show_default=True, help="Fixed pacing: steps per stage.")
@click.option("--patience", type=click.IntRange(1), default=200, show_default=True, help="Patience pacing: τ.")
@click.option("--max-stage-steps", type=click.IntRange(1), default=None, help="Patience pacing: the longest a stage may run.")
@click.option("--cumulative/--no-cumulative", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Permutation seed of the random order.")
@click.option("--difficulty", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Order measured: a difficulty probe's difficulty.json (its search's report/ artifact).")
@click.option("--measure", type=click.Choice(["convergence_steps", "kl"]), default="convergence_steps",
              show_default=True, help="Order measured: the probe's measure, clusters easiest (smallest) first.")
@click.option("--reference", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Order shuffled under patience pacing: an easy-to-hard trial's curriculum/schedule.json.")
@click.option("--distribution", type=click.Choice(["uniform", "logit-normal", "loss-second-moment"]), default="uniform",
              show_default=True, help="What t is drawn from inside the active set.")
@click.option("--logit-mean", type=float, default=0.0, show_default=True, help="logit-normal: m.")
@click.option("--logit-std", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="logit-normal: s.")
@click.option("--sample", "draws", type=click.IntRange(1), default=None, help="Draw M timesteps per stage with the real sampler.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def preview(timesteps, clusters, order, clustering, schedule, pacing, stage_steps, patience, max_stage_steps,
            cumulative, seed, difficulty, measure, reference, distribution, logit_mean, logit_std, draws, as_json):
    """Show the clusters (C1 = lowest noise, hardest) and the stages a curriculum will run."""
    from paceray.protocol import PacerayError
    from trainables.denoiser.preview import build_sampler, render_table
    from trainables.denoiser.preview import preview as make_preview

    if clusters > timesteps:
        raise PacerayError(f"--clusters: {clusters} clusters cannot split {timesteps} timesteps")
    ranking = None
    if order == "measured":
        if difficulty is None:
            raise PacerayError("--order measured needs --difficulty PATH (a probe search's difficulty.json)")
        from trainables.diffusion.difficulty import check_setting, load_difficulty
        from trainables.diffusion.difficulty import ranking as rank_clusters

        try:
            data = load_difficulty(difficulty)
            check_setting(data, f"--difficulty {difficulty}", timesteps=timesteps, num_clusters=clusters,
                          clustering=clustering, schedule=schedule)
            ranking = rank_clusters(data, measure, clusters)
        except ValueError as e:
            raise PacerayError(str(e)) from None
    reference_lengths = None
    if order == "shuffled" and pacing == "patience":
        if reference is None:
            raise PacerayError("--order shuffled with --pacing patience needs --reference PATH (an easy-to-hard "
                               "trial's curriculum/schedule.json)")
        from trainables.diffusion.curriculum import reference_stage_lengths

        try:
            reference_lengths = reference_stage_lengths(reference)
        except (ValueError, OSError) as e:
            raise PacerayError(f"--reference {e}") from None
    try:
        sampler = build_sampler(timesteps, clusters, order, clustering=clustering, schedule=schedule, pacing=pacing,
                                stage_steps=stage_steps, patience=patience, cumulative=cumulative, seed=seed,
                                ranking=ranking, max_stage_steps=max_stage_steps,
                                reference_lengths=reference_lengths, distribution=distribution,
                                logit_mean=logit_mean, logit_std=logit_std)
    except ValueError as e:
        raise PacerayError(f"--order {order}: {e}") from None
    result = make_preview(sampler, schedule, clustering, draws)
    if result["warning"] and not as_json:
        click.echo(f"warning: {result['warning']}", err=True)
    click.echo(json.dumps(result, indent=2) if as_json else render_table(result))


@click.group()
def data() -> None:
    """Prepare datasets as Parquet shards in the storage root."""


@data.command()
@click.argument("dataset", type=_choices(Dataset))
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="Directory with the raw files (IDX files, CIFAR python batches, an image folder).")
@click.option("--storage", type=click.Path(file_okay=False), default=None,
              help="Storage root (default: PACERAY_STORAGE, else ~/.cache/paceray).")
def prepare(dataset, source, storage):
    """Write DATASET once as Parquet shards plus a manifest; a second call is a no-op."""
    from paceray.protocol import storage_root
    from trainables.diffusion.assets import preparing
    from trainables.diffusion.data import prepare as prepare_dataset
    from trainables.diffusion.data import read_manifest

    root = Path(storage).resolve() if storage else storage_root()
    with preparing(dataset, root):
        path = prepare_dataset(dataset, root, source=source)
    m = read_manifest(path)
    counts = ", ".join(f"{k}: {v['count'] if isinstance(v, dict) else v}" for k, v in m["splits"].items())
    click.echo(f"{dataset}: {counts} images of shape {tuple(m['image_shape'])} in {path}")


@click.group("fid-net")
def fid_net() -> None:
    """The domain feature network for FID without a download."""


@fid_net.command("train")
@click.argument("dataset", type=_choices(Dataset))
@click.option("--source", type=click.Path(file_okay=False), default=None)
@click.option("--storage", type=click.Path(file_okay=False), default=None)
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=None,
              help="Default: enough for the accuracy target. A fraction (0.2) trains on that share of one epoch.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_fid_net_command(dataset, source, storage, epochs, seed):
    """Train the small classifier whose penultimate features give the `classifier` FID."""
    from paceray.protocol import storage_root
    from trainables.diffusion.assets import preparing, train_dataset_fid_net

    root = Path(storage).resolve() if storage else storage_root()
    with preparing(dataset, root):
        path, info = train_dataset_fid_net(dataset, root, source=source, epochs=epochs, seed=seed)
    click.echo(f"{dataset}: fid-net test accuracy {info['accuracy']:.4f} → {path}")


COMMANDS = [curriculum, data, fid_net]
