"""A training step's draws are functions of (seed, rank, step), whatever ran before them, and the
initial weights of the seed alone."""

from __future__ import annotations

import torch

from trainables.diffusion.draws import StepDraws, initial_seed
from trainables.diffusion.model import build_model


def test_a_steps_noise_depends_on_its_key_alone():
    like = torch.zeros(4, 1, 8, 8)
    a = StepDraws(seed=3, rank=0, device="cpu")
    first = a.noise(7, like)
    a.noise(8, like), torch.randn(100)  # other draws in between change nothing
    assert torch.equal(a.noise(7, like), first)
    assert torch.equal(StepDraws(3, 0, "cpu").noise(7, like), first)  # a fresh process (a resume) too
    for other in (StepDraws(3, 0, "cpu").noise(8, like), StepDraws(3, 1, "cpu").noise(7, like),
                  StepDraws(4, 0, "cpu").noise(7, like)):
        assert not torch.equal(other, first)
    assert first.shape == like.shape and first.dtype == torch.float32


def test_label_dropout_and_network_dropout_are_keyed_too():
    d = StepDraws(seed=1, rank=0, device="cpu")
    drops = torch.rand(16, generator=d.labels(5))
    torch.rand(3, generator=d.labels(6))
    assert torch.equal(torch.rand(16, generator=d.labels(5)), drops)
    d.seed_dropout(5)
    mask = torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)
    torch.randn(10)
    d.seed_dropout(5)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True), mask)


def test_initial_weights_are_the_seeds_and_leave_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with initial_seed(0):
        a = build_model("tiny", 8, 1)
    assert torch.equal(torch.get_rng_state(), before)
    torch.randn(5)  # a rank whose global generator is elsewhere builds the same network
    with initial_seed(0):
        b = build_model("tiny", 8, 1)
    with initial_seed(1):
        c = build_model("tiny", 8, 1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
