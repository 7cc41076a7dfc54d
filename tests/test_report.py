"""`posttrain report`: the HTML report of a run and its terminal summary.

The run directory is built by tests/sample_run.py with the run's own artifact store, from CPython's
documentation text; no engine is needed. The browser test renders the page in headless Chromium
(Debian `chromium`, installed by `make test`).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.reporting.report import write_report
from pipeline.reporting.run_stats import RunDirError, read_metrics
from pipeline.reporting.training_plots import DPO_FIGURES, _global_steps, dpo_rounds, expert_load_matrix
from pipeline.run.artifacts import ArtifactStore
from tests.sample_run import build_sample_run

PLOTS = ("funnel", "domains_tiers", "critique_scores", "response_lengths", "operators", "sft_loss",
         "expert_load", "reward_accuracy", "dpo_rounds", "dpo_held_out", "eval")


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    return build_sample_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def report(sample_run):
    return write_report(sample_run)


def _image_stats(png: bytes) -> tuple[tuple[int, int], float, int]:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    grey = img.convert("L")
    return img.size, ImageStat.Stat(grey).stddev[0], len(img.getcolors(maxcolors=1 << 20) or [])


def test_every_plot_is_embedded_and_not_blank(report, sample_run):
    html = report.path.read_text()
    assert report.path == sample_run / "report" / "report.html"
    embedded = re.findall(r'<img class="plot" data-plot="([a-z_]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"',
                          html)
    assert [name for name, _ in embedded] == list(PLOTS)
    for name, b64 in embedded:
        size, std, colors = _image_stats(base64.b64decode(b64))
        assert size[0] >= 300 and size[1] >= 150, name
        assert std > 5 and colors > 20, f"plot {name} looks blank (std {std:.1f}, {colors} colours)"
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "<script" not in html
    assert 'class="empty"' not in html


def test_figures_match_the_run(report, sample_run):
    store = ArtifactStore(sample_run)
    counts = {name: store.count_records(name) for name in ("seeds", "sft", "online_pairs")}
    funnel_line = next(line for line in report.summary_lines if line.startswith("funnel:"))
    for name, n in counts.items():
        assert f"{name} {n}" in funnel_line
    sft = store.read_dataset("sft")
    tiers_line = next(line for line in report.summary_lines if line.startswith("SFT tiers:"))
    for tier in set(sft["tier"]):
        assert f"tier {tier}: {sft['tier'].count(tier)}" in tiers_line

    drops = store.read_manifest("filter")["metrics"]["dropped_by_reason"]
    drops_line = next(line for line in report.summary_lines if line.startswith("filter dropped:"))
    assert all(f"{reason} {n}" in drops_line for reason, n in drops.items())
    assert any(line.startswith("generate dropped: malformed 1") for line in report.summary_lines)

    rows = read_metrics(sample_run, "dpo")
    rounds = dpo_rounds(sample_run)
    assert sorted(rounds) == sorted(r["round"] for r in rows)
    for row in rows:
        assert rounds[row["round"]]["reward"] == row["reward_mean"]
        assert rounds[row["round"]]["margin"] == row["reward_margin"]
        assert rounds[row["round"]]["kl"] == row["kl"]
        assert rounds[row["round"]]["win_rate"] == row["eval_win_rate"]
        assert rounds[row["round"]]["dpo_accuracy"] == row["rewards_accuracies"]
    dpo = next(s for s in report.sections if s.key == "dpo_rounds")
    assert dpo.table[0] == ["round", *DPO_FIGURES]
    held = next(s for s in report.sections if s.key == "dpo_held_out")
    assert [row[0] for row in held.table[1:]] == [1, 2]
    assert held.table[2][held.table[0].index("gain at equal length")] == "0.2"
    assert held.table[2][held.table[0].index("judge gain")] == "0.1"
    ev = next(s for s in report.sections if s.key == "eval")
    assert [row[0] for row in ev.table[1:]] == ["start", "sft", "final"]
    assert ev.table[3][-1] == "0.1 (0 to 0.2)"  # final vs start, prompt-level loose, with its interval
    assert any(line.startswith("eval final: ") for line in report.summary_lines)

    sft_rows = read_metrics(sample_run, "sft")
    xs = _global_steps(sft_rows)  # phase 1 restarts its step count: it is drawn after phase 0
    assert len({r["phase"] for r in sft_rows}) == 2 and all(b > a for a, b in zip(xs, xs[1:], strict=False))
    heldout = store.read_manifest("sft")["metrics"]
    assert (f"SFT: heldout_nll_before {heldout['heldout_nll_before']:.4g}, "
            f"heldout_nll_after {heldout['heldout_nll_after']:.4g}") in report.summary_lines
    matrix, step = expert_load_matrix(sft_rows)
    last = [r for r in sft_rows if any(k.startswith("expert_load/layer_") for k in r)][-1]
    assert step == last["step"]
    assert len(matrix) == 4 and all(len(r) == 8 for r in matrix)
    assert matrix[3][5] == last["expert_load/layer_03/expert_05"]


def test_verification_table_shows_the_checks_of_the_filter_and_reward_manifests(tmp_path, sample_run):
    """The table of the critic's calibration, the constraint pass rates, code tests and the reward model's held-out
    in-domain accuracy, from the figures the sample run's manifests hold."""
    report = write_report(sample_run, tmp_path / "r.html")
    table = {row[0]: row[1:] for row in {s.key: s for s in report.sections}["verification"].table[1:]}
    assert table["critic calibration AUC (reference vs corrupted tiers)"] == [0.8125, "80 answers, 2 ungraded"]
    assert table["critic mean tier: truncated"][0] == 2.1
    assert table["constraints followed (every constraint of the response)"] == ["40%", "30 responses"]
    assert table["constraint followed: lowercase"] == ["70%", "10 responses"]
    assert table["code responses passing their tests"][0] == "4/9"
    assert table["reward model accuracy, held-out in-domain pairs"] == [0.625, "8 pairs of unseen instructions"]
    assert any(line.startswith("checks: critic calibration AUC") and "0.8125" in line for line in report.summary_lines)
    assert 'data-empty="verification"' not in (tmp_path / "r.html").read_text()


def test_partial_run_sections_say_no_data(tmp_path, sample_run):
    """A run that only has its seeds: every later section explains what is missing instead of failing."""
    run = tmp_path / "partial"
    shutil.copytree(sample_run / "datasets" / "seeds", run / "datasets" / "seeds")
    shutil.copytree(sample_run / "stages" / "seeds", run / "stages" / "seeds")
    shutil.copy(sample_run / "config.yaml", run / "config.yaml")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    html = (run / "report" / "report.html").read_text()
    assert re.findall(r'data-plot="([a-z_]+)"', html) == ["funnel"]
    empty = dict(re.findall(r'<p class="empty" data-empty="([a-z_]+)">([^<]+)</p>', html))
    assert set(empty) == set(PLOTS) - {"funnel"} | {"verification"}
    assert "stages/sft/metrics.jsonl" in empty["sft_loss"]
    assert "no data yet for:" in result.output and "SFT loss curves" in result.output


def test_report_stage_runs_last_in_the_graph(tmp_path, sample_run):
    """The `report` stage of the default graph writes RUN_DIR/report/report.html through the runner."""
    run = tmp_path / "run"
    shutil.copytree(sample_run, run, ignore=shutil.ignore_patterns("report"))
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {run}\ngraph: [report]\nstages:\n  report: {{examples: 1}}\n")
    result = CliRunner().invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = ArtifactStore(run).read_manifest("report")
    assert manifest["state"] == "done" and manifest["metrics"]["plots"] == len(PLOTS)
    html = (run / "report" / "report.html").read_text()
    assert re.findall(r'data-plot="([a-z_]+)"', html) == list(PLOTS)
    assert html.count("<pre>") == 2  # one example record: its instruction and its answer


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "not a posttrain run directory" in result.output


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Appended to a copy of the page: after load, every <img> is drawn on a canvas and its pixel variance
# measured, in the browser, so a plot that the browser cannot decode or shows blank is caught.
PROBE = """<pre id="probe">pending</pre><script>
window.addEventListener('load', () => {
  const out = [...document.images].map(img => {
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
    const d = c.width ? ctx.getImageData(0, 0, c.width, c.height).data : [];
    let n = 0, s = 0, s2 = 0;
    for (let i = 0; i < d.length; i += 28) { const v = (d[i] + d[i + 1] + d[i + 2]) / 3; n++; s += v; s2 += v * v; }
    const r = img.getBoundingClientRect();
    return {plot: img.dataset.plot, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
            shown: r.width * r.height, variance: n ? s2 / n - (s / n) ** 2 : 0};
  });
  document.getElementById('probe').textContent = JSON.stringify(out);
});
</script></body>"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "Debian chromium is not installed; `make test` installs it (apt-get install chromium)"
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(report, tmp_path):
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(report.path.read_text().replace("</body>", PROBE))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri())
    found = re.search(r'<pre id="probe">(\[.*?\])</pre>', dom.stdout, re.S)
    assert found, f"the probe did not run in chromium: {dom.stderr[-2000:]}"
    images = json.loads(found.group(1))
    assert [i["plot"] for i in images] == list(PLOTS)
    for img in images:
        assert img["complete"] and img["w"] > 300 and img["h"] > 150, img
        assert img["shown"] > 10_000, f"plot {img['plot']} is not displayed: {img}"
        assert img["variance"] > 50, f"plot {img['plot']} renders blank in chromium: {img}"

    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", report.path.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    size, std, colors = _image_stats(shot.read_bytes())
    assert size == (1280, 2400)
    assert std > 10 and colors > 100, f"the screenshot looks blank (std {std:.1f}, {colors} colours)"
