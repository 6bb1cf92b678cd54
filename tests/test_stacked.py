"""The stacked path of packed arms (trainables/denoiser/stacked.py) against the per-arm loop, on
CPU: three arms (`none`, `easy-to-hard`, `shuffled`, one of them under min-SNR weighting) trained
for a few steps from the same weights on the same batches and noise, each way.

Tolerance: the stacked forward runs the same operations batched over arms (vmap), which may sum
in another order. Per step, the losses agree to 1e-5 relative. The weights: AdamW's update is
m/(√v + ε), ±lr on the first step whatever the gradient's size, so a weight whose gradient is
near zero (|g| ~ ε) takes an update that a last-bit difference in g changes. After 6 steps at
lr 2e-3, at most 5 weights in 1,000 of an arm differ by more than 1e-6 (measured: up to 0.11%),
and none by more than lr/4 (measured: 1.9e-4, already after the first step, not growing). The EMA follows the
weights; the stack's AdamW state, handed back to each arm's optimizer, is the loop's."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_base
from trainables.denoiser import train as T
from trainables.denoiser.config import Config
from trainables.diffusion import data
from trainables.diffusion.data import BatchOrder, ImageBatches
from trainables.diffusion.diffusion import GaussianDiffusion
from trainables.diffusion.draws import StepDraws, initial_seed
from trainables.diffusion.model import build_model

STEPS = 6
ARMS = [({"order": "none"}, {}), ({"order": "easy-to-hard"}, {}), ({"order": "shuffled"}, {"weighting": "min-snr"})]


def _trial(storage, compute: str):
    cfgs = []
    for curriculum, loss in ARMS:
        base = tiny_base(train={"steps": STEPS, "batch_size": 16, "pack_compute": compute},
                         curriculum={**curriculum, "stage_steps": 2}, loss=loss)
        cfgs.append(Config.model_validate(base))
    cfg, device = cfgs[0], torch.device("cpu")
    images, labels = data.load_split(data.prepare("digits", storage), "train")
    batches = ImageBatches(images, labels, cfg.train.batch_size, cfg.data.image_size, device=device,
                           order=BatchOrder(seed=0, rank=0))
    diffusion = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    trial = T._Trial(cfg, None, 0, 1, device, False, None, batches, diffusion, evaluator=None,
                     draws=StepDraws(0, 0, device), packed=True)
    with initial_seed(0):
        model = build_model("tiny", cfg.data.image_size, 1, None)
    trial.arms = [T._new_arm(trial, f"a{i}", c, model) for i, c in enumerate(cfgs)]
    for arm in trial.arms:
        arm.train_model = arm.model
        arm.interval = T._Interval.begin(trial, arm)
    return trial


def _train(trial) -> list[list[float]]:
    losses = []
    for step in range(1, STEPS + 1):
        x0, y = next(trial.batches)
        T._step_arms(trial, step, (x0, y, trial.draws.noise(step, x0)))
        losses.append([float(arm.interval.loss.sum() / arm.interval.count.sum()) for arm in trial.arms])
    return losses


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    storage = tmp_path_factory.mktemp("stacked")
    torch.set_num_threads(1)
    loop, stacked = _trial(storage, "loop"), _trial(storage, "stacked")
    return loop, _train(loop), stacked, _train(stacked)


def test_the_stacked_path_runs_stacked(both):
    _, _, stacked, _ = both
    assert stacked.stack is not None and len(stacked.stack) == 3
    # each arm's module holds views into the stack: its EMA, evals and checkpoints see the weights
    name, p = next(iter(stacked.arms[1].model.named_parameters()))
    assert p.data_ptr() == stacked.stack.params[name][1].data_ptr()


def test_stacked_losses_equal_the_loops_within_tolerance(both):
    _, loop_losses, _, stacked_losses = both
    for step, (a, b) in enumerate(zip(loop_losses, stacked_losses), start=1):
        assert a == pytest.approx(b, rel=1e-5), step


def test_stacked_weights_ema_and_optimizer_state_equal_the_loops_within_tolerance(both):
    loop, _, stacked, _ = both
    stacked.stack.store_optimizers([arm.optimizer for arm in stacked.arms])
    lr = loop.cfg.train.lr
    for a, b in zip(loop.arms, stacked.arms):
        diffs = torch.cat([(p - q).abs().flatten() for p, q in zip(a.model.parameters(), b.model.parameters())])
        assert diffs.max() <= lr / 4 and (diffs > 1e-6).float().mean() <= 5e-3, (a.key, diffs.max())
        ema = torch.cat([(p - q).abs().flatten() for p, q in zip(a.ema.averaged.shadow_params,
                                                                   b.ema.averaged.shadow_params)])
        assert ema.max() <= lr / 4 and (ema > 1e-6).float().mean() <= 5e-3, a.key
        sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(float(sa[i]["step"]) == float(sb[i]["step"]) == STEPS for i in sa)
        for i in sa:
            assert torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], atol=1e-7, rtol=1e-3)
    # the arms did not train alike: the comparison is not of three copies of one
    first = [next(arm.model.parameters()).detach().clone() for arm in loop.arms]
    assert not torch.equal(first[0], first[1])


def test_an_arm_that_ends_leaves_the_stack_with_its_state(both):
    _, _, stacked, _ = both
    trial = copy.copy(stacked)
    ended = trial.arms[2]
    ended.failed = "non-finite loss (test)"
    before = [p.detach().clone() for p in trial.arms[0].model.parameters()]
    x0, y = next(trial.batches)
    T._step_arms(trial, STEPS + 1, (x0, y, trial.draws.noise(STEPS + 1, x0)))
    assert tuple(a.key for a in trial.stacked_arms) == ("a0", "a1") and len(trial.stack) == 2
    assert any(not torch.equal(p, q) for p, q in zip(before, trial.arms[0].model.parameters()))
    assert all(torch.isfinite(p).all() for p in ended.model.parameters())  # its own storage, untouched


def test_a_packed_checkpoint_is_checked_arm_by_arm(tmp_path, both):
    """A pack's checkpoint (a folder per live arm and pack.json) loads only if every live arm's
    state does; one whose arms all ended (failed or stopped) holds none and is fine."""
    import json

    from paceray.protocol import PacerayError
    from trainables.denoiser.export import check_checkpoint

    loop, _, _, _ = both
    pack = tmp_path / "checkpoint_step00000006"
    for arm in loop.arms[:2]:
        (pack / arm.key).mkdir(parents=True)
        torch.save(T._state(arm, STEPS, 1, {}), pack / arm.key / T.CHECKPOINT_FILE)
    (pack / T.PACK_FILE).write_text(json.dumps({"step": STEPS, "world": 1, "failed": {"a2": "non-finite"}}))
    check_checkpoint(pack)
    (pack / "a1" / T.CHECKPOINT_FILE).write_bytes(b"torn")
    with pytest.raises(PacerayError, match=r"a1/state.pt: corrupted checkpoint"):
        check_checkpoint(pack)
    ended = tmp_path / "ended"
    ended.mkdir()
    (ended / T.PACK_FILE).write_text(json.dumps({"step": 4, "world": 1, "stopped": {"a0": 4, "a1": 4}}))
    check_checkpoint(ended)
    (ended / T.PACK_FILE).write_text("{torn")
    with pytest.raises(PacerayError, match="pack.json: corrupted"):
        check_checkpoint(ended)
