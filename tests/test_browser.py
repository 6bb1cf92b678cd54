"""What a user sees, in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright with executable_path: no browser download) against the real `mlflow server` that holds
the finished quick search of test_tune_e2e. Screenshots land in each test's temp folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from paceray.protocol import keys

from test_tune_e2e import quick_search, search_runs, seeded_search  # noqa: F401  (the shared finished searches)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium. Without it the tests skip on a developer's machine, but fail where they
    must run: `.ci/run` installs the package and sets PACERAY_REQUIRE_BROWSER."""
    executable = shutil.which("chromium")
    if executable is None:
        message = "no chromium on PATH (apt-get install chromium)"
        if os.environ.get("PACERAY_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # No sandbox: CI runs as root, where Chromium refuses its own.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    return page


def _search(quick_search):
    _, _, shared = quick_search
    client, parents, children = search_runs(shared)
    return shared, client, parents[0], children


def test_the_printed_url_lands_on_the_comparison(browser, quick_search, tmp_path):
    from paceray.tracking import ui_view

    shared, client, parent, children = _search(quick_search)
    run_dir, result, _ = quick_search
    key = parent.data.tags[keys.VIEW_TAG]
    url = ui_view.comparison_url(shared.uri, parent.info.experiment_id, key)
    # The search printed it (for its server), and `paceray ui` prints the same for the embedded one.
    assert f"the trials compared in MLflow's UI: {url}" in result.stdout
    page = _page(browser, url)
    try:
        section = page.get_by_text("eval/fid by trial")
        section.wait_for(timeout=60_000)
        # the FID chart: one series per child, named in its legend as "RUN (eval/fid)"
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length > 0",
                               timeout=60_000)
        assert page.locator(".js-plotly-plot").count() == 1  # no chart of every other metric around it
        for child in children:
            page.get_by_text(f"{child.info.run_name} (eval/fid)").first.wait_for(timeout=30_000)
        # the children listed, and the difference table with their numeric eval/fid and searched setting
        table = page.locator("text=Compare by").first
        table.wait_for(timeout=30_000)
        text = page.inner_text("body")
        for child in children:
            assert child.info.run_name in text
            assert f"{child.data.metrics['eval/fid']:.2f}" in text, child.data.metrics["eval/fid"]
        assert "curriculum.order" in text and "easy-to-hard" in text and "hard-to-easy" in text
        assert parent.info.run_name not in text.split("Compare by")[0].split("Run Name")[-1]  # children only
        page.screenshot(path=tmp_path / "comparison.png")
    finally:
        page.close()


def test_the_experiment_opens_on_its_runs(browser, quick_search, tmp_path):
    from paceray.tracking import ui_view

    shared, client, parent, children = _search(quick_search)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == keys.EXPERIMENT_KIND["mlflow.experimentKind"]
    page = _page(browser, ui_view.comparison_url(shared.uri, parent.info.experiment_id, None))
    try:
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        assert "/runs" in page.url and "overview" not in page.url
        assert "matching runs" in page.inner_text("body")
        page.screenshot(path=tmp_path / "runs.png")
    finally:
        page.close()


def test_the_parent_report_renders_with_its_plots(browser, quick_search, tmp_path):
    shared, client, parent, children = _search(quick_search)
    report = Path(parent.info.artifact_uri.removeprefix("file://")) / "report" / "report.html"
    # As MLflow's artifact view shows it: in a sandboxed iframe, where only data URIs resolve.
    page = _page(browser, f"{shared.uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
                          f"/artifacts/report/report.html")
    try:
        page.wait_for_selector("iframe", timeout=60_000)
        frame = next(f for f in _frames_when_loaded(page) if "What was compared" in f.content())
        text = frame.inner_text("body")
        for heading in ("What was compared", "Arms against the baseline", "FID and KID over training",
                        "Each arm's curriculum", "The last sample grid of each arm", "Every trial"):
            assert heading in text, heading
        images = frame.locator("img")
        assert images.count() >= 3
        sizes = frame.evaluate("[...document.images].map(i => [i.src.slice(0, 11), i.naturalWidth])")
        assert all(src == "data:image/" and width > 0 for src, width in sizes), sizes
        page.screenshot(path=tmp_path / "report-in-mlflow.png", full_page=True)
    finally:
        page.close()
    # Opened as a file, offline: it asks for nothing over the network.
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requested = []
    page.on("request", lambda r: requested.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    try:
        page.goto(report.as_uri())
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert requested == []
        page.screenshot(path=tmp_path / "report.png", full_page=True)
    finally:
        page.close()


def _frames_when_loaded(page, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frames = [f for f in page.frames if f != page.main_frame]
        ready = [f for f in frames if _has_body(f)]
        if ready:
            return ready
        time.sleep(0.5)
    raise AssertionError(f"no loaded iframe in {page.url}")


def _has_body(frame) -> bool:
    try:
        return bool(frame.evaluate("document.body && document.body.innerText.length > 0"))
    except Exception:
        return False


def test_a_seeded_search_reads_as_one_line_per_arm(browser, seeded_search, shared, tmp_path):
    """The seeded search's view (8 runs: 4 arms × 2 seeds) groups its runs by `paceray.arm`: the
    chart's legend names the 4 arms, not the 8 runs."""
    from paceray.tracking import ui_view

    client, parents, children = search_runs(shared, "seeded")
    (parent,) = parents
    url = ui_view.comparison_url(shared.uri, parent.info.experiment_id, parent.data.tags[keys.VIEW_TAG])
    page = _page(browser, url)
    try:
        page.get_by_text("eval/fid by trial").wait_for(timeout=60_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length > 0",
                               timeout=60_000)
        arms = sorted({c.data.tags[keys.ARM_TAG] for c in children})
        assert len(arms) == 4
        for arm in arms:
            page.get_by_text(arm).first.wait_for(timeout=30_000)
        legend = page.locator(".js-plotly-plot .legend").first.inner_text() if page.locator(
            ".js-plotly-plot .legend").count() else ""
        text = page.inner_text("body")
        for child in children:  # no run of its own in the chart
            assert f"{child.info.run_name} (eval/fid)" not in text + legend
        page.screenshot(path=tmp_path / "grouped.png")
    finally:
        page.close()
