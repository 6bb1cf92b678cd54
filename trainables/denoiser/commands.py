"""The denoiser's own CLI tools, mounted under `paceray`: curriculum preview, data prepare,
fid-net train. Only click and the (torch-free) config sections are imported here; each command
loads torch when it runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

import click
from pydantic import ValidationError

from trainables.diffusion.config import NEEDS_PATH, CurriculumConfig, Dataset, DiffusionConfig

# `curriculum preview`'s word for a path field that the curriculum needs and the flags do not give.
NEEDS_FLAG = {
    "difficulty": "--order measured needs --difficulty PATH (a probe search's difficulty.json)",
    "reference": ("--order shuffled with --pacing patience needs --reference PATH (an easy-to-hard "
                  "trial's curriculum/schedule.json)"),
}


def _choices(literal) -> click.Choice:
    return click.Choice(list(get_args(literal)))


def _field_type(info):
    """The click type of a config field: its choices, or its number type within the field's bounds."""
    kind = info.annotation
    if get_origin(kind) in (Union, UnionType):  # Optional[X]: None is the default, never a flag's value
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is Literal:
        return _choices(kind)
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    if kind not in (int, float) or not bounds:
        return kind
    number = click.IntRange if kind is int else click.FloatRange
    return number(bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt")),
                  min_open="gt" in bounds, max_open="lt" in bounds)


def _field(section, name: str, *flags: str, **kwargs):
    """A click option for field `name` of a config section: its default and help are the field's,
    and so is its type unless `kwargs` gives one, so a flag cannot drift from the config it builds."""
    info = section.model_fields[name]
    if info.annotation is not bool:
        kwargs.setdefault("type", _field_type(info))
    return click.option(*flags, name, default=info.default, show_default=info.default is not None,
                        help=info.description, **kwargs)


def _curriculum(fields: dict):
    """The CurriculumConfig the flags give; PacerayError naming the flag when it is not one."""
    from paceray.protocol import PacerayError

    try:
        return CurriculumConfig(**fields)
    except ValidationError as e:
        error = e.errors()[0]
        if error["type"] == NEEDS_PATH:
            raise PacerayError(NEEDS_FLAG[error["ctx"]["field"]]) from None
        raise PacerayError(f"--order {fields['order']}: {error['msg'].removeprefix('Value error, ')}") from None


def _inputs(config: CurriculumConfig, timesteps: int, schedule: str):
    """What the flags' files hold, read and checked: measured's ranking, shuffled's stage lengths."""
    from paceray.protocol import PacerayError
    from trainables.diffusion.curriculum import SamplerInputs, reference_stage_lengths
    from trainables.diffusion.difficulty import check_setting, load_difficulty, ranking

    c, ranked, lengths = config, None, None
    if c.order == "measured":
        try:
            data = load_difficulty(c.difficulty)
            check_setting(data, f"--difficulty {c.difficulty}", timesteps=timesteps, num_clusters=c.num_clusters,
                          clustering=c.clustering, schedule=schedule)
            ranked = ranking(data, c.difficulty_measure, c.num_clusters)
        except ValueError as e:
            raise PacerayError(str(e)) from None
    if c.order == "shuffled" and c.pacing == "patience":
        try:
            lengths = reference_stage_lengths(c.reference)
        except (ValueError, OSError) as e:
            raise PacerayError(f"--reference {e}") from None
    return SamplerInputs(ranking=ranked, reference_lengths=lengths)


@click.group()
def curriculum() -> None:
    """Inspect timestep curricula."""


@curriculum.command()
@_field(DiffusionConfig, "timesteps", "--timesteps", "-T")
@_field(CurriculumConfig, "num_clusters", "--clusters", "-N")
@_field(CurriculumConfig, "order", "--order")
@_field(CurriculumConfig, "clustering", "--clustering")
@_field(DiffusionConfig, "schedule", "--schedule")
@_field(CurriculumConfig, "pacing", "--pacing")
@_field(CurriculumConfig, "stage_steps", "--stage-steps")
@_field(CurriculumConfig, "patience", "--patience")
@_field(CurriculumConfig, "max_stage_steps", "--max-stage-steps")
@_field(CurriculumConfig, "cumulative", "--cumulative/--no-cumulative")
@_field(CurriculumConfig, "seed", "--seed")
@_field(CurriculumConfig, "difficulty", "--difficulty", type=click.Path(dir_okay=False, exists=True))
@_field(CurriculumConfig, "difficulty_measure", "--measure")
@_field(CurriculumConfig, "reference", "--reference", type=click.Path(dir_okay=False, exists=True))
@_field(CurriculumConfig, "distribution", "--distribution")
@_field(CurriculumConfig, "logit_mean", "--logit-mean")
@_field(CurriculumConfig, "logit_std", "--logit-std")
@click.option("--sample", "draws", type=click.IntRange(1), default=None, help="Draw M timesteps per stage with the real sampler.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def preview(timesteps, schedule, draws, as_json, **fields):
    """Show the clusters (C1 = lowest noise, hardest) and the stages a curriculum will run."""
    from paceray.protocol import PacerayError
    from trainables.denoiser.preview import build_sampler, render_table
    from trainables.denoiser.preview import preview as make_preview

    if fields["num_clusters"] > timesteps:
        raise PacerayError(f"--clusters: {fields['num_clusters']} clusters cannot split {timesteps} timesteps")
    config = _curriculum(fields)
    inputs = _inputs(config, timesteps, schedule)
    try:
        sampler = build_sampler(config, timesteps, schedule, inputs)
    except ValueError as e:
        raise PacerayError(f"--order {config.order}: {e}") from None
    result = make_preview(sampler, schedule, draws)
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
@click.option("--captions", default=None, metavar="templated|FILE",
              help="Captions beside the images: `templated` (from the class names), or a .jsonl/.csv/.parquet of "
                   "image files (relative to --source) and texts. An image folder's own captions.jsonl or "
                   "captions.csv is used without it.")
def prepare(dataset, source, storage, captions):
    """Write DATASET once as Parquet shards plus a manifest (and captions, if given); a second
    call is a no-op."""
    from paceray.protocol import storage_root
    from trainables.diffusion.assets import preparing
    from trainables.diffusion.captions import folder_captions, prepare_captions
    from trainables.diffusion.data import prepare as prepare_dataset
    from trainables.diffusion.data import read_manifest

    root = Path(storage).resolve() if storage else storage_root()
    if captions is None and dataset == "imagefolder" and source is not None:
        captions = folder_captions(source)
    with preparing(dataset, root):
        path = prepare_dataset(dataset, root, source=source)
        prepared = prepare_captions(path, captions, source if dataset == "imagefolder" else None) if captions else None
    m = read_manifest(path)
    counts = ", ".join(f"{k}: {v['count'] if isinstance(v, dict) else v}" for k, v in m["splits"].items())
    click.echo(f"{dataset}: {counts} images of shape {tuple(m['image_shape'])} in {path}")
    if prepared is not None:
        kind = "templated from the class names" if prepared.templated else f"from {prepared.source}"
        click.echo(f"captions {prepared.key} ({kind}): {sum(prepared.counts.values())} in {prepared.path}")


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


@click.command("sample")
@click.argument("export", type=click.Path(exists=True, file_okay=False))
@click.option("--n", "n", type=click.IntRange(1, 4096), default=16, show_default=True, help="Images to draw.")
@click.option("--steps", type=click.IntRange(1, 10_000), default=50, show_default=True, help="DDIM steps.")
@click.option("--label", type=int, default=None, help="A class-conditional model: the class of every image.")
@click.option("--prompt", default=None, help="A text-conditioned model: the caption of every image.")
@click.option("--guidance", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Classifier-free guidance scale (1: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="The grid PNG; what was drawn goes beside it as .json.")
def sample_command(export, n, steps, label, prompt, guidance, seed, out):
    """Draw images from an exported model (a search's best/pipeline) into one grid PNG."""
    from trainables.denoiser.sample import SampleRequest, sample

    record = sample(SampleRequest(Path(export).resolve(), n, steps, label, prompt, guidance, seed), Path(out))
    what = f"class {label}" if label is not None else "no condition"
    click.echo(f"{record['n']} images ({what}, {steps} DDIM steps, seed {seed}) in {out}; "
               f"{Path(out).with_suffix('.json')} says how")


COMMANDS = [curriculum, data, fid_net, sample_command]
