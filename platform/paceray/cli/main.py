"""The `paceray` command line. Importing it imports no torch, Ray or MLflow: each command loads
what it needs when it runs, so `--help` and spec checks answer at once."""

from __future__ import annotations

import functools
import sys

import click

from paceray.base.errors import PacerayError, one_line

SPEC = click.argument("spec", type=click.Path(dir_okay=False))
SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                   help="Override a trial config path for every trial (pins it if it was searched).")
ADDRESS = click.option("--address", default=None, envvar="RAY_ADDRESS",
                       help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started for this run).")
TRACKING = click.option("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else a store under the run directory).")
RESUME = click.option("--resume", is_flag=True, help="Continue from the latest checkpoints instead of starting afresh.")


def user_errors(fn, mapped: tuple = (PacerayError,)):
    """One line and a non-zero exit for a problem the user can fix; a traceback only with --debug.
    A trainable's commands are the edge of its pure code, which raises ValueError: mapped too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except mapped as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"paceray: error: {one_line(str(e))}", err=True)
            sys.exit(getattr(e, "exit_code", 2))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="paceray")
def main(debug: bool) -> None:
    """Search diffusion-training timestep curricula with Ray Tune, Ray Train and MLflow.

    Each registered trainable (paceray.trainables entry points) adds its own commands."""


@main.command()
@SPEC
@SET
@ADDRESS
@TRACKING
@RESUME
@click.option("--run-dir", default=None, help="Where results, checkpoints and the embedded MLflow store go.")
@user_errors
def train(spec, overrides, address, tracking_uri, resume, run_dir):
    """Run one trial (the spec's base config plus --set) through Ray Train, without Tune."""
    from paceray.spec.invocation import Invocation
    from paceray.trial.standalone import run_train

    run_train(Invocation(spec, tuple(overrides), address, tracking_uri, resume, run_dir))


@main.command()
@SPEC
@SET
@ADDRESS
@TRACKING
@RESUME
@click.option("--run-dir", default=None, help="Where results, checkpoints and the embedded MLflow store go.")
@click.option("--verbose", is_flag=True, help="Ray's worker output on the terminal, and plain progress lines, "
                                              "instead of the live view (which names the log file it goes to).")
@user_errors
def tune(spec, overrides, address, tracking_uri, resume, run_dir, verbose):
    """Search the spec's space with Ray Tune: one MLflow child run per trial."""
    from paceray.search.driver import run_tune
    from paceray.spec.invocation import Invocation

    run_tune(Invocation(spec, tuple(overrides), address, tracking_uri, resume, run_dir, verbose))


@main.command()
@click.argument("experiment")
@TRACKING
@click.option("--run-dir", default=None, help="Run directory of the embedded store (default ./runs).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write the report's files (tables, plots) here.")
@click.option("--target", type=float, default=None,
              help="A value of the search metric to time each arm to (default: the trainable's report chooses; "
                   "the denoiser's: each seed's baseline final FID).")
@user_errors
def report(experiment, tracking_uri, run_dir, out, target):
    """The latest search's trials sorted by the search metric, from MLflow (finished or running); the
    trainable's report hook adds its analysis and plots."""
    from paceray.report.command import run_report

    run_report(experiment, tracking_uri=tracking_uri, run_dir=run_dir, out=out, target=target)


@main.command()
@click.argument("experiment", required=False)
@click.option("--run-dir", default=None, help="Run directory of the embedded store (default ./runs).")
@click.option("--port", default=5000, show_default=True)
@user_errors
def ui(experiment, run_dir, port):
    """Serve the MLflow UI on the embedded store (127.0.0.1 only), and print the URL that opens on
    the newest search's comparison (of EXPERIMENT, if given)."""
    from paceray.tracking.server import serve_ui

    serve_ui(run_dir, port, experiment)


@main.command("replay-tracking")
@click.argument("spool_dir", type=click.Path(exists=True, file_okay=False))
@TRACKING
@user_errors
def replay_tracking(spool_dir, tracking_uri):
    """Deliver MLflow writes a trial queued on disk while its tracking server was away."""
    from pathlib import Path

    from paceray.tracking.server import apply_client_env, client_env
    from paceray.tracking.spool import replay

    apply_client_env(client_env(embedded=False))  # a server still away fails in seconds, not minutes
    click.echo(f"{spool_dir}: {replay(Path(spool_dir), tracking_uri)}")


def _add_trainable_commands() -> None:
    # Each registered trainable's own tools (the denoiser's curriculum preview, data prepare,
    # fid-net train). Loading a trainable imports its Config and click, never torch.
    from paceray.spec.registry import all_trainables

    for trainable in all_trainables():
        for command in trainable.commands():
            if command.name in main.commands:
                continue  # the first trainable (by name) keeps a name two of them use
            for sub in getattr(command, "commands", {}).values():
                sub.callback = user_errors(sub.callback, (PacerayError, ValueError))
            if command.callback is not None:
                command.callback = user_errors(command.callback, (PacerayError, ValueError))
            main.add_command(command)


_add_trainable_commands()
