"""FID: honest on real data, equal to scipy's Fréchet distance, cached reference statistics,
exact across 2 gloo ranks, and the Inception-v3 weights paths (local file, env, no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from paceray.base.errors import PacerayError
from trainables.diffusion.data import load_split, prepare, resize_images, to_unit_range
from trainables.diffusion.fid import (INCEPTION_ENV, FIDEvaluator, ReferenceImages, ReferenceStats, kid_score,
                                      load_extractor, load_inception, reference_statistics, update_together)
from trainables.diffusion.fid_net import FidNetRecipe, train_fid_net


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Prepared digits, a briefly trained FID network and its feature extractor."""
    root = tmp_path_factory.mktemp("fid")
    dataset_dir = prepare("digits", root)
    net_path = root / "fid-net-digits.pt"
    info = train_fid_net(dataset_dir, net_path, FidNetRecipe(epochs=15, seed=0))
    extractor = load_extractor("classifier", dataset_dir=dataset_dir, fid_net_path=net_path)
    return {"root": root, "dataset_dir": dataset_dir, "net_path": net_path, "info": info, "extractor": extractor}


def test_fid_net_is_accurate_and_saved_with_its_provenance(digits):
    assert digits["info"]["accuracy"] >= 0.95
    record = torch.load(digits["net_path"], weights_only=True)
    manifest = json.loads((digits["dataset_dir"] / "manifest.json").read_text())
    assert record["dataset"] == "digits" and record["dataset_hash"] == manifest["content_hash"]
    assert record["image_size"] == 8 and record["arch"]["feature_dim"] == 128
    assert record["accuracy"] == digits["info"]["accuracy"]
    # named with its weights' digest: FIDs of a retrained network are grouped apart
    assert digits["extractor"].feature_name == f"classifier:digits@8px(d=128)#{digits['extractor'].weights_id[:8]}"
    assert not list(digits["net_path"].parent.glob(".*.tmp"))  # the atomic write left nothing behind


def _fid(extractor, reference, images, batch=128, labels=None):
    evaluator = FIDEvaluator(extractor, reference)
    for start in range(0, len(images), batch):
        evaluator.update(images[start:start + batch], None if labels is None else labels[start:start + batch])
    return evaluator.compute()


def test_class_accuracy_is_the_fid_nets_own_on_the_labels_images_were_drawn_for(digits):
    """Labelled images (a class-conditional model's samples and their labels) are classified by
    the FID network's own head: held-out digits with their labels score its accuracy, counted here
    through its forward; shuffled labels score chance; forks and one shared pass count apart; no
    labels, no accuracy."""
    extractor = digits["extractor"]
    reference = reference_statistics(extractor, digits["dataset_dir"], digits["root"] / "stats",
                                     ReferenceImages(split="train"))
    images, labels = load_split(digits["dataset_dir"], "test")
    images = to_unit_range(images)
    with torch.no_grad():
        expected = float((extractor.net(images).argmax(1) == labels).double().mean())
    assert expected > 0.9
    assert _fid(extractor, reference, images, labels=labels)["class_accuracy"] == pytest.approx(expected, abs=1e-12)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert _fid(extractor, reference, images, labels=shuffled)["class_accuracy"] < 0.3
    assert math.isnan(_fid(extractor, reference, images)["class_accuracy"])
    base = FIDEvaluator(extractor, reference)
    forks = [base.fork(), base.fork()]
    update_together(forks, [images, images], [labels, shuffled])
    together = [e.compute()["class_accuracy"] for e in forks]
    assert together[0] == pytest.approx(expected, abs=1e-12) and together[1] < 0.3


def test_fid_is_low_on_held_out_images_and_grows_with_noise(digits):
    extractor = digits["extractor"]
    reference = reference_statistics(extractor, digits["dataset_dir"], digits["root"] / "stats",
                                     ReferenceImages(split="train"))
    held_out = to_unit_range(load_split(digits["dataset_dir"], "test")[0])
    noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(0))
    clean = _fid(extractor, reference, held_out)
    assert clean["features"] == extractor.feature_name
    assert clean["num_fake"] == len(held_out) and clean["num_real"] == reference.num_samples == 1438
    noisy = [_fid(extractor, reference, (held_out + level * noise).clamp(-1, 1))["fid"]
             for level in (0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip([clean["fid"]] + noisy, noisy)), (clean["fid"], noisy)
    assert noisy[2] > 4 * clean["fid"], (clean["fid"], noisy)  # noise at 0.4 is far from the data
    # training at 16 px: reference and generated images are both 16 px, the extractor takes them to 8
    reference16 = reference_statistics(extractor, digits["dataset_dir"], digits["root"] / "stats",
                                       ReferenceImages(image_size=16))
    held_out16 = to_unit_range(resize_images(load_split(digits["dataset_dir"], "test")[0], 16))
    assert _fid(extractor, reference16, held_out16)["fid"] < noisy[0]


def _scipy_frechet(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


class VectorFeatures(nn.Module):
    """Identity features: FID of the samples themselves."""

    feature_name = "identity(d=5)"
    num_features = 5
    weights_id = "none"

    def forward(self, x):
        return x.flatten(1)


def test_arms_scored_in_one_feature_pass_get_the_fids_they_get_alone(digits):
    """Packed arms' samples go through the feature network together (`update_together`): each
    arm's FID and KID are those of scoring it alone, up to the network's reduction order over a
    larger batch (relative 1e-4 here; the features themselves agree to ~1e-6), and the forks keep
    their images apart."""
    extractor = digits["extractor"]
    reference = reference_statistics(extractor, digits["dataset_dir"], digits["root"] / "stats",
                                     ReferenceImages(split="train"))
    held_out = to_unit_range(load_split(digits["dataset_dir"], "test")[0])[:300]
    noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(1))
    sets = [held_out, (held_out + 0.2 * noise).clamp(-1, 1), (held_out + 0.6 * noise).clamp(-1, 1)]
    base = FIDEvaluator(extractor, reference)
    forks = [base.fork() for _ in sets]
    for start in range(0, 300, 100):
        update_together(forks, [images[start:start + 100] for images in sets])
    together = [e.compute() for e in forks]
    alone = [_fid(extractor, reference, images, batch=100) for images in sets]
    for got, want in zip(together, alone):
        assert got["num_fake"] == want["num_fake"] == 300
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-4) and got["kid"] == pytest.approx(want["kid"], rel=1e-4)
    assert together[0]["fid"] < together[1]["fid"] < together[2]["fid"]
    assert int(base.metric.fake_features_num_samples) == 0  # the base saw none of them
    another = load_extractor("classifier", dataset_dir=digits["dataset_dir"], fid_net_path=digits["net_path"])
    with pytest.raises(ValueError, match="forked from one"):
        update_together([base, FIDEvaluator(another, reference)], [held_out[:4], held_out[:4]])


def test_frechet_distance_matches_scipy_on_known_gaussians():
    rng = np.random.default_rng(0)
    d = 5
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    sigma1, sigma2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.1 * np.eye(d)  # SPD, not commuting
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 1.0
    # the reference side holds exactly (mu1, sigma1), as sufficient statistics of n samples
    n = 1000
    reference = ReferenceStats(n, torch.tensor(n * mu1), torch.tensor((n - 1) * sigma1 + n * np.outer(mu1, mu1)),
                               VectorFeatures.feature_name, {})
    mean, cov = reference.mean_and_cov()
    np.testing.assert_allclose(cov.numpy(), sigma1, rtol=1e-10, atol=1e-10)
    samples = rng.multivariate_normal(mu2, sigma2, size=4000)
    result = _fid(VectorFeatures(), reference, torch.tensor(samples, dtype=torch.float32), batch=1000)
    samples32 = samples.astype(np.float32).astype(np.float64)  # what the metric saw
    expected = _scipy_frechet(mu1, sigma1, samples32.mean(0), np.cov(samples32, rowvar=False))
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    # and the sample estimate is near the population distance
    assert result["fid"] == pytest.approx(_scipy_frechet(mu1, sigma1, mu2, sigma2), rel=0.1)
    assert result["num_fake"] == 4000 and result["num_real"] == n


def test_reference_statistics_are_cached(digits):
    extractor, cache = digits["extractor"], digits["root"] / "cache-test"
    calls = []
    hook = extractor.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    try:
        first = reference_statistics(extractor, digits["dataset_dir"], cache,
                                     ReferenceImages(split="test", batch_size=100))
        assert sum(calls) == 359 and len(list(cache.iterdir())) == 1
        calls.clear()
        second = reference_statistics(extractor, digits["dataset_dir"], cache,
                                      ReferenceImages(split="test", batch_size=100))
        assert calls == []  # read from disk: the extractor did not run
        assert second.num_samples == first.num_samples == 359
        assert torch.equal(second.feature_sum, first.feature_sum) and torch.equal(second.outer_sum, first.outer_sum)
        assert second.feature_sum.dtype == torch.float64
        # another image size is another cache entry
        reference_statistics(extractor, digits["dataset_dir"], cache, ReferenceImages(split="test", image_size=16))
        assert sum(calls) == 359 and len(list(cache.iterdir())) == 2
    finally:
        hook.remove()


def _fid_on_rank(rank, world, rendezvous, net_path, dataset_dir, cache, images_path, out_dir):
    torch.set_num_threads(1)
    # A file, not a free port: a port found free can be taken before the rank binds it.
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        extractor = load_extractor("classifier", dataset_dir=dataset_dir, fid_net_path=net_path)
        # every rank passes the reference; the evaluator must count it once (rank 0), not twice
        reference = reference_statistics(extractor, dataset_dir, cache)
        images = torch.load(images_path)[rank::world]
        labels = torch.load(Path(images_path).with_name("labels.pt"))[rank::world]
        evaluator = FIDEvaluator(extractor, reference)
        for start in range(0, len(images), 50):  # uneven shares and batches across ranks
            evaluator.update(images[start:start + 50], labels[start:start + 50])
        result = evaluator.compute()
        evaluator.reset()  # the next evaluation: the same images in one batch per rank
        evaluator.update(images)
        result["again"] = evaluator.compute()["fid"]
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fid_from_two_gloo_ranks_equals_one_process(digits, tmp_path):
    extractor, cache = digits["extractor"], digits["root"] / "stats"
    reference = reference_statistics(extractor, digits["dataset_dir"], cache)
    held_out = to_unit_range(load_split(digits["dataset_dir"], "test")[0])
    images = (held_out + 0.3 * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    labels = load_split(digits["dataset_dir"], "test")[1]
    torch.save(images, tmp_path / "images.pt")
    torch.save(labels, tmp_path / "labels.pt")
    single = _fid(extractor, reference, images, labels=labels)
    mp.spawn(_fid_on_rank, nprocs=2, join=True,
             args=(2, str(tmp_path / "rendezvous"), digits["net_path"], digits["dataset_dir"], cache, tmp_path / "images.pt", tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["num_fake"] == len(images) and result["num_real"] == single["num_real"]
        assert result["features"] == single["features"]
        assert result["fid"] == pytest.approx(single["fid"], rel=1e-6)
        assert result["again"] == pytest.approx(single["fid"], rel=1e-6)  # reset kept the reference, once
        # KID from the same features: the ranks' interleaved shares give the one-process score
        assert result["kid_subset_size"] == single["kid_subset_size"] == len(images)
        assert result["kid"] == pytest.approx(single["kid"], rel=1e-6, abs=1e-9)
        assert result["kid_std"] == pytest.approx(single["kid_std"], rel=1e-6, abs=1e-9)
        assert result["class_accuracy"] == pytest.approx(single["class_accuracy"], abs=1e-12)  # counts summed
    assert single["kid"] > 0 and 0.3 < single["class_accuracy"] <= 1


def _poly_mmd_unbiased(x, y):
    """MMD² with KID's kernel k(a, b) = (a·b / d + 1)³, unbiased, computed here with numpy."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_is_the_unbiased_polynomial_mmd_and_ranks_closer_sets_lower(digits):
    extractor, cache = digits["extractor"], digits["root"] / "stats"
    reference = reference_statistics(extractor, digits["dataset_dir"], cache)
    assert reference.kid_features.shape == (reference.num_samples, 128)  # every digit kept (< 10,000)
    held_out = to_unit_range(load_split(digits["dataset_dir"], "test")[0])
    noisy = (held_out + 0.5 * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    clean, corrupted = _fid(extractor, reference, held_out), _fid(extractor, reference, noisy)
    assert clean["kid"] < corrupted["kid"] and clean["fid"] < corrupted["fid"]
    # Where both sides have exactly the subset size, every subset is the whole set: the score is
    # the unbiased MMD² of the two sets, with no spread.
    with torch.no_grad():
        fake = extractor(noisy[:300]).double()
    real = reference.kid_features[:300].double()
    kid, std, subset = kid_score(real, fake)
    assert subset == 300 and std == pytest.approx(0, abs=1e-9)
    assert kid == pytest.approx(_poly_mmd_unbiased(real.numpy(), fake.numpy()), rel=1e-9)
    assert kid_score(real, fake[torch.randperm(300)])[0] == pytest.approx(kid, rel=1e-12)  # order-free


# --- Inception-v3 -----------------------------------------------------------------------------

class ScriptedInceptionLike(nn.Module):
    """A random network with the calling convention of the TorchScript Inception-v3 file
    (RGB pixels in [0, 255], any size, resized to 299 inside, `return_features` -> 2048-d).
    The real file needs a download this machine cannot make."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 2048, 1)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.shape[1] == 3, "wants RGB"
        assert bool(img.min() >= 0.0) and bool(img.max() <= 255.0), "wants pixel values in [0, 255]"
        x = F.interpolate(img, size=[299, 299], mode="bilinear", align_corners=False)
        x = F.adaptive_avg_pool2d((x - 128.0) / 128.0, 8)
        features = torch.relu(self.proj(x)).mean(dim=[2, 3])
        return features if return_features else features[:, :1008]


@pytest.fixture
def inception_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(ScriptedInceptionLike()).save(str(path))
    return path


def test_inception_local_weights_give_2048_features_for_gray_and_rgb(inception_file, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    extractor = load_extractor("inception", inception_weights=inception_file)
    assert extractor.feature_name.startswith("inception-v3-2015-12-05(d=2048)#") and extractor.num_features == 2048
    gray = torch.rand(4, 1, 8, 8) * 2 - 1
    features = extractor(gray)
    assert features.shape == (4, 2048) and features.dtype == torch.float32
    assert torch.allclose(features, extractor(gray.expand(-1, 3, -1, -1)))  # gray is replicated to RGB
    rgb = torch.rand(3, 3, 32, 32) * 4 - 2  # out of range: clamped, not passed on
    assert extractor(rgb).shape == (3, 2048)
    assert not torch.allclose(extractor(rgb[:1]), extractor(-rgb[:1]))
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))  # the environment variable is the same route
    assert torch.equal(load_inception()(gray), features)


def test_inception_errors_are_one_line_and_say_how_to_provide_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(PacerayError, match="not found") as missing:
        load_extractor("inception", inception_weights=tmp_path / "nowhere.pt")
    # nothing on this port: the download fails at once, as it does on a machine without network
    with pytest.raises(PacerayError, match=INCEPTION_ENV) as offline:
        load_inception(url="http://127.0.0.1:9/inception-2015-12-05.pt", cache_dir=tmp_path / "hub")
    assert not list((tmp_path / "hub").iterdir())  # no partial download left behind
    state_dict_file = tmp_path / "weights.pth"
    torch.save(nn.Linear(2, 2).state_dict(), state_dict_file)
    with pytest.raises(PacerayError, match="not the TorchScript") as foreign:
        load_inception(state_dict_file)
    for error in (missing, offline, foreign):
        assert "\n" not in str(error.value)
    with pytest.raises(PacerayError, match="fid-net train"):
        load_extractor("classifier", fid_net_path=tmp_path / "no-net.pt")
    with pytest.raises(PacerayError, match="unknown FID features"):
        load_extractor("vgg")


def test_two_commands_preparing_one_storage_root_train_its_fid_net_once(tmp_path):
    """Two searches started together on a fresh storage root: one trains the FID network and
    computes the reference statistics, the other waits for it and then finds them made."""
    import subprocess
    import sys

    code = ("import sys; from trainables.denoiser.features import prepare; from paceray.protocol import PrepareContext; "
            "from trainables.denoiser.config import Config; "
            "config = Config.model_validate({'data': {'dataset': 'digits', 'image_size': 8}, 'model': {'preset': 'tiny'}}); "
            "prepare(config.model_dump(), PrepareContext(storage=sys.argv[1], tracking_uri=None))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    joined = "\n".join(outputs)
    assert joined.count("training the digits FID network once") == 1, joined
    assert "waiting for preparing digits" in joined, joined
    assert len(list((tmp_path / "fid-nets").glob("digits-*.pt"))) == 1 and not list(tmp_path.rglob("command.lock"))


def test_a_fraction_of_an_epoch_trains_that_share_of_the_batches(digits, tmp_path):
    info = train_fid_net(digits["dataset_dir"], tmp_path / "quick.pt", FidNetRecipe(epochs=0.5, seed=0))
    assert info["epochs"] == 0.5 and 0.0 < info["accuracy"] <= 1.0
    assert torch.load(tmp_path / "quick.pt", weights_only=True)["epochs"] == 0.5
    with pytest.raises(ValueError, match="epochs must be > 0"):
        train_fid_net(digits["dataset_dir"], tmp_path / "none.pt", FidNetRecipe(epochs=0))


def test_a_retrained_fid_network_is_another_feature_space(digits, tmp_path):
    """The same architecture and data, other weights (here: the file saved again with one more
    key, so its digest differs): another feature name, so the report never ranks the two
    networks' FIDs together."""
    record = torch.load(digits["net_path"], weights_only=True)
    again = tmp_path / "retrained.pt"
    torch.save({**record, "retrained": True}, again)
    other = load_extractor("classifier", dataset_dir=digits["dataset_dir"], fid_net_path=again)
    assert other.feature_name != digits["extractor"].feature_name
    assert other.feature_name.split("#")[0] == digits["extractor"].feature_name.split("#")[0]
