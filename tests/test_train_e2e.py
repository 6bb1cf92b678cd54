"""`paceray train` for real: Ray Train workers (gloo), an MLflow server, FID evals, resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from conftest import (REPO, checkpoint_dirs, checkpoint_step, experiment_runs, history, kill_session, prelaunched,
                      registered_checkpoint_step, run_paceray, start_paceray, tiny_base, wait_for_checkpoint,
                      write_spec)

pytestmark = pytest.mark.slow

STEPS, STAGE, EVERY = 60, 10, 30
# loss-second-moment: its histories are all-gathered every step, a collective the two DDP ranks
# must both make (T=100 so that the first stage's 25 timesteps warm up and its weights apply).
# Class-conditional: each rank's samples are classified against their labels, the counts summed.
TWO_WORKER_BASE = tiny_base(train={"steps": STEPS, "log_every": 5}, diffusion={"timesteps": 100, "schedule": "cosine"},
                            curriculum={"stage_steps": STAGE, "distribution": "loss-second-moment"},
                            data={"class_conditional": True}, eval={"every": EVERY})


def only_run(where, experiment: str):
    client, runs = experiment_runs(where, experiment)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@prelaunched
def two_worker_trial(shared, tmp):
    spec = write_spec(tmp / "two.yaml", "two-workers", TWO_WORKER_BASE, resources={"workers": 2, "cpus_per_worker": 1})
    result = shared.paceray("train", spec, "--run-dir", tmp / "runs")
    return tmp / "runs", result, shared


def test_two_worker_trial_logs_every_metric(two_worker_trial):
    run_dir, result, shared = two_worker_trial
    client, run = only_run(shared, "two-workers")
    assert run.info.status == "FINISHED"
    keys = set(run.data.metrics)
    for key in ("train/loss", "curriculum/stage", "curriculum/t_min", "curriculum/t_max", "perf/img_per_s",
                "eval/fid", "eval/class_accuracy", "train/lr"):
        assert key in keys, key
    assert {f"train/loss_c{k}" for k in range(1, 5)} <= keys
    assert run.data.params["curriculum.order"] == "easy-to-hard"
    assert run.data.params["curriculum.num_clusters"] == "4"
    assert run.data.tags["paceray.trial_id"]
    assert "classifier:digits" in run.data.tags["paceray.fid_features"]
    assert "64 samples" in run.data.tags["paceray.fid_features"]
    fids = history(client, run.info.run_id, "eval/fid")
    assert [s for s, _ in fids] == [EVERY, 2 * EVERY]
    assert all(math.isfinite(v) and v > 0 for _, v in fids)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "curriculum")}
    assert {"curriculum/schedule.png", "curriculum/schedule.json"} <= artifacts
    # progress on the console: step, stage, loss, img/s, and the last FID
    assert "step 40/60 · stage" in result.stdout and "img/s · FID" in result.stdout


def test_t_min_steps_down_exactly_as_the_preview_says(two_worker_trial):
    run_dir, _, shared = two_worker_trial
    client, run = only_run(shared, "two-workers")
    preview = json.loads(run_paceray("curriculum", "preview", "-T", 100, "-N", 4, "--order", "easy-to-hard",
                                     "--stage-steps", STAGE, "--json").stdout)

    def stage_of(step):  # logged step s was trained with the sampler at step s - 1
        for st in preview["stages"]:
            if st["start_step"] <= step - 1 and (st["end_step"] is None or step - 1 < st["end_step"]):
                return st
        raise AssertionError(step)

    t_min = history(client, run.info.run_id, "curriculum/t_min")
    stages = dict(history(client, run.info.run_id, "curriculum/stage"))
    assert [s for s, _ in t_min] == list(range(5, STEPS + 1, 5))
    for step, value in t_min:
        st = stage_of(step)
        assert value == st["ranges"][0][0], (step, value, st)
        assert stages[step] == st["stage"]
    assert [v for _, v in t_min][:8] == [75, 75, 50, 50, 25, 25, 0, 0]
    # every timestep active from the step the preview names, logged once, at that step
    full = preview["full_from_step"]
    assert full == 3 * int(STAGE) + 1
    assert history(client, run.info.run_id, "curriculum/full_from_step") == [(full, full)]


def test_fid_in_the_loop_with_two_workers_equals_one_process(two_worker_trial, storage):
    """Regenerate both ranks' images from the last checkpoint in one process: same FID."""
    from trainables.denoiser.config import Config
    from trainables.diffusion.diffusion import GaussianDiffusion
    from trainables.denoiser.export import load_checkpoint_model
    from trainables.diffusion.assets import dataset_path
    from trainables.denoiser.features import fid_evaluator
    from trainables.denoiser.train import Sampling, generate_share
    from trainables.diffusion.model import null_label

    run_dir, _, shared = two_worker_trial
    client, run = only_run(shared, "two-workers")
    ckpt = checkpoint_dirs(run_dir)[-1]
    assert ckpt.name == f"checkpoint_step{STEPS:08d}"
    model, cfg = load_checkpoint_model(ckpt, Config.model_validate(TWO_WORKER_BASE).model_dump())
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    evaluator = fid_evaluator(cfg, storage, dataset_path(cfg.data, storage), "cpu")  # the loop's own, one process
    classes = null_label(model)  # class-conditional: the loop drew each image for a label, as here
    assert classes == 10
    for rank in (0, 1):
        for x, y in generate_share(Sampling(cfg, diffusion, rank, 2, torch.device("cpu"), classes), model):
            evaluator.update(x, y)
    one_process = evaluator.compute()
    logged = dict(history(client, run.info.run_id, "eval/fid"))[STEPS]
    assert one_process["num_fake"] == cfg.eval.fid_samples
    assert one_process["fid"] == pytest.approx(logged, rel=1e-6, abs=1e-6)
    # KID from the same features and samples: the two ranks' score is the one-process score
    logged_kid = dict(history(client, run.info.run_id, "eval/kid"))[STEPS]
    assert one_process["kid"] == pytest.approx(logged_kid, rel=1e-6, abs=1e-9)
    # the class accuracy of the same samples against the labels they were drawn for: both ranks' counts
    logged_accuracy = dict(history(client, run.info.run_id, "eval/class_accuracy"))[STEPS]
    assert one_process["class_accuracy"] == pytest.approx(logged_accuracy, abs=1e-12)
    assert dict(history(client, run.info.run_id, "eval/kid_std"))[STEPS] >= 0


def _local_instance_exposure(root: int) -> dict:
    """What the command with process `root` (and its descendants: the local Ray instance, its
    workers, the MLflow server) listens on beyond loopback, whether its GCS refuses a client
    without a token, and the permissions of the token file it made."""
    import ipaddress
    import shutil

    import grpc
    import psutil

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)

    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    listening, exposed, gcs, token = [], [], None, None
    for p in procs:
        try:
            name, conns, env = p.name(), p.net_connections(kind="inet"), p.environ()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening.append((name, c.laddr.ip, c.laddr.port))
                if not loopback(c.laddr.ip):
                    exposed.append(name)
                if name == "gcs_server":
                    gcs = c.laddr.port
        token = token or env.get("RAY_AUTH_TOKEN_PATH")
    assert gcs is not None and token, listening
    channel = grpc.insecure_channel(f"127.0.0.1:{gcs}")
    try:
        channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId", request_serializer=lambda x: x,
                            response_deserializer=lambda x: x)(b"", timeout=10)
        refused = "accepted"
    except grpc.RpcError as e:
        refused = e.code().name
    finally:
        channel.close()
    modes = oct(Path(token).stat().st_mode & 0o777), oct(Path(token).parent.stat().st_mode & 0o777)
    shutil.rmtree(Path(token).parent)  # the command is killed next: it cannot remove its own
    return {"exposed": sorted(exposed), "gcs_without_token": refused, "token_mode": modes[0],
            "token_dir_mode": modes[1], "listening": listening}


@pytest.mark.own_ray
def test_resume_after_a_kill_continues_the_same_run(tmp_path, storage):
    base = tiny_base(train={"steps": 120, "log_every": 5}, curriculum={"stage_steps": 25}, eval={"every": 20})
    spec = write_spec(tmp_path / "resume.yaml", "resume", base)
    run_dir = tmp_path / "runs"
    # Ray's authentication as a user has it by default: RAY_AUTH_MODE unset.
    proc = start_paceray("train", spec, "--run-dir", run_dir, log=tmp_path / "train.log", env={"RAY_AUTH_MODE": None})
    try:
        # A checkpoint Ray Train registered (a folder on disk may still be being written; Ray
        # resumes only from registered ones).
        wait_for_checkpoint(run_dir, proc)
        time.sleep(0.5)  # a few steps past the checkpoint: they are lost and re-trained
        exposure = _local_instance_exposure(proc.pid)
    finally:
        kill_session(proc.pid)  # the whole `paceray train`: driver, Ray and its workers
        proc.wait(timeout=60)
    registered = registered_checkpoint_step(run_dir)
    assert max(checkpoint_step(p) for p in checkpoint_dirs(run_dir)) < 120

    # Resumed on two workers where one wrote the checkpoint (a user who got a bigger node): the
    # data is resharded, everything else continues.
    result = run_paceray("train", spec, "--run-dir", run_dir, "--resume", "--set", "resources.workers=2")
    import re

    resumed = re.search(r"resumed from the checkpoint at step (\d+)", result.stdout)
    assert resumed and int(resumed.group(1)) == registered >= 20, (registered, result.stdout[-3000:])
    assert "written by 1 worker(s), this run has 2" in result.stdout
    client, run = only_run(run_dir, "resume")  # one run, not two
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "curriculum/stage", "curriculum/t_min", "eval/fid"):
        steps = [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)]
        assert steps == sorted(set(steps)), f"{key} logged a step twice or out of order: {steps}"
    stage = dict(history(client, run.info.run_id, "curriculum/stage"))
    # the stage carried over: the schedule is the fixed one across the kill, step by step
    assert all(stage[s] == min(4, (s - 1) // 25 + 1) for s in stage), stage
    assert max(stage) == 120 and [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(5, 121, 5))
    # The default local start (no --address, the embedded store): no dead "View run" links.
    assert "paceray ui --run-dir" in result.stdout and "View run" not in result.stdout + result.stderr
    # ... usable from this machine only: every port of the command's processes on loopback but
    # torch's TCPStore of the trial's process group (README lists it), and a client without
    # the run's token refused; the token made for the run, readable by its user alone.
    assert exposure["exposed"] == ["ray::RayTrainWorker"], exposure
    assert exposure["gcs_without_token"] == "UNAUTHENTICATED", exposure
    assert exposure["token_mode"] == "0o600" and exposure["token_dir_mode"] == "0o700", exposure


# Class-conditional: the label dropout draws too. Every step logged, an eval (and a checkpoint) at 4.
KEYED_BASE = tiny_base(data={"class_conditional": True}, train={"steps": 8, "log_every": 1},
                       eval={"every": 4, "fid_samples": 16, "sampler_steps": 2, "sample_grid": 0})


@prelaunched
def resumed_and_uninterrupted(shared, tmp):
    """The same trial twice: 8 steps at once, and 4 steps then `--resume` to 8."""
    whole = write_spec(tmp / "whole.yaml", "keyed-whole", KEYED_BASE)
    shared.paceray("train", whole, "--run-dir", tmp / "whole")
    parts = write_spec(tmp / "parts.yaml", "keyed-parts", KEYED_BASE)
    shared.paceray("train", parts, "--run-dir", tmp / "parts", "--set", "train.steps=4")
    shared.paceray("train", parts, "--run-dir", tmp / "parts", "--resume")
    return shared


def test_a_resumed_trial_draws_what_an_uninterrupted_one_draws(resumed_and_uninterrupted):
    """Noise, label dropout and dropout are keyed by (seed, rank, step) like the data and the
    timesteps, and the weights start from the seed: the resumed half's losses are the
    uninterrupted run's, bit for bit (fp32, one worker, one thread)."""
    shared = resumed_and_uninterrupted
    (client, whole), (_, parts) = only_run(shared, "keyed-whole"), only_run(shared, "keyed-parts")
    a, b = history(client, whole.info.run_id, "train/loss"), history(client, parts.info.run_id, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    assert a == b


@prelaunched
def fashion_mnist_trial(shared, tmp):
    # A fifth of an epoch of the Fashion-MNIST FID network (the default 6 take ~3 min on one core):
    # this test checks the path, not the net's accuracy (tests/test_fid.py and the note measure that).
    from trainables.diffusion.datasets_sources import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return None  # the test's fashion_mnist fixture says why (skip here, fail in CI)
    net = shared.paceray("fid-net", "train", "fashion-mnist", "--epochs", 0.2, env={"OMP_NUM_THREADS": "1"})
    result = shared.paceray("train", "search_spaces/fashion-mnist.yaml", "--run-dir", tmp / "runs",
                            "--set", "resources.gpus_per_worker=0", "--set", "resources.cpus_per_worker=1",
                            "--set", "model.preset=tiny", "--set", "train.steps=4", "--set", "train.batch_size=16",
                            "--set", "train.log_every=2", "--set", "eval.every=4", "--set", "eval.fid_samples=16",
                            "--set", "eval.sampler_steps=2", cwd=REPO)
    return net, result


def test_fashion_mnist_spec_runs_a_few_steps(fashion_mnist, fashion_mnist_trial, shared):
    net, result = fashion_mnist_trial
    assert "fid-net test accuracy" in net.stdout
    client, run = only_run(shared, "fashion-mnist")
    assert run.info.status == "FINISHED"
    assert "classifier:fashion-mnist" in run.data.tags["paceray.fid_features"]
    assert [s for s, _ in history(client, run.info.run_id, "eval/fid")] == [4]
    assert "eval at step 4" in result.stdout
