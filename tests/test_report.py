"""`dpnas report`: one self-contained page per study, attached to it; `dpnas plot`'s shared plotly.js and PNG/SVG.

One tiny study (two one-epoch trials on digits, plus a failed trial whose reason holds markup) serves every
test. Where a Chrome/Chromium is installed, a real headless browser renders the pages and kaleido exports PNG/SVG;
elsewhere those tests are skipped with the reason.
"""

import html
import json
import re
import subprocess

import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState, create_trial
from plotly.offline import get_plotlyjs
from search_helpers import unfix, write_study

from dpnas.analysis.figures import study_figures, write_figures
from dpnas.analysis.report import attached_report, figure_caption, figure_title, report_html, write_report
from dpnas.analysis.static import StaticExportError, find_browser
from dpnas.cli import main
from dpnas.search.runner import search
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_report import resolve_study
from dpnas.search.weights import default_location

MARKUP = "<script>alert('x')</script> & <b>bold</b>"
BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chrome/Chromium here (apt-get install chromium)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    path = write_study(folder, n_trials=2, sampler="random", extra=f'description = "{MARKUP}"')
    search(load_study_file(path), progress=False)
    study, url = resolve_study(str(path))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"failure_reason": f"boom {MARKUP}"}))
    return study, url, path


@pytest.fixture(scope="module")
def page(tiny):
    study, url, path = tiny
    return report_html(study, storage_url=url, where=str(path))


def _dom(path):
    """The DOM after the page's scripts ran, as headless Chromium serialises it."""
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                           "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_holds_question_privacy_trials_and_every_figure(tiny, page):
    study, _, _ = tiny
    privacy = study_privacy(study)
    assert f"epsilon = {privacy.epsilon:.4f}, delta = {privacy.delta:g} for the whole dataset" in page
    assert html.escape(privacy.explanation) in page
    assert "digits" in page and "one of selu, relu, mish" in page  # the question: data and search space
    for name, figure in study_figures(study).items():
        assert html.escape(figure_title(figure, name)) in page
        assert html.escape(figure_caption(name, figure)) in page
    rows = re.findall(r'<tr class="state-(\w+)">', page)
    assert sorted(rows) == ["COMPLETE", "COMPLETE", "FAIL"]
    best = study.best_trial
    assert f"<h3>Trial {best.number}: val_accuracy = {best.value:.4g}</h3>" in page
    assert "stored in the artifact store" in page and best.user_attrs["weights_artifact_id"] in page


def test_report_is_self_contained_with_plotly_once_and_small(page):
    banner = get_plotlyjs()[:60]
    assert page.count(banner) == 1
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing to fetch: it opens offline
    assert len(page.encode()) < 8_000_000


def test_report_escapes_user_text(page):
    assert MARKUP not in page and "<b>bold</b>" not in page
    assert html.escape(f"boom {MARKUP}") in page  # the failure reason, as text
    assert html.escape(MARKUP) in page  # the description


def test_report_cli_writes_beside_the_plots_and_attaches_it(tiny, tmp_path, monkeypatch, capsys):
    study, url, path = tiny
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(path)]) == 0
    out = tmp_path / "runs" / "plots-tiny" / "report.html"
    printed = capsys.readouterr().out
    assert "wrote runs/plots-tiny/report.html" in printed and "attached to the study" in printed
    assert attached_report(study, location=default_location(url)) == out.read_bytes()
    assert main(["report", str(path), "--out", str(tmp_path / "again.html")]) == 0  # replaces the same artifact
    reports = [m for m in get_all_artifact_meta(study) if m.filename == "report.html"]
    assert len(reports) == 1 and reports[0].mimetype == "text/html"
    assert attached_report(study, location=default_location(url)) == (tmp_path / "again.html").read_bytes()
    assert sorted(p.name for p in (tmp_path / "runs" / "plots-tiny").iterdir()) == ["report.html"]  # no scratch
    listed, served = _dashboard_artifacts(study, url)  # what optuna-dashboard shows and serves
    assert listed == [("report.html", "text/html")] and served == (tmp_path / "again.html").read_bytes()


def _dashboard_artifacts(study, url):
    """The study's artifacts as optuna-dashboard's API lists them, and the report's bytes as it serves them."""
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    from dpnas.search.weights import open_store

    app = wsgi(study._storage, artifact_store=open_store(default_location(url)))

    def get(path):
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        return b"".join(app(environ, lambda status, headers, exc_info=None: None))

    artifacts = json.loads(get(f"/api/studies/{study._study_id}"))["artifacts"]
    report = next(a["artifact_id"] for a in artifacts if a["filename"] == "report.html")
    return [(a["filename"], a["mimetype"]) for a in artifacts], get(f"/artifacts/{study._study_id}/{report}")


def test_report_refuses_bad_input_before_writing(tiny, tmp_path, monkeypatch, capsys):
    _, _, path = tiny
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(tmp_path / "missing.journal")]) == 2
    assert main(["report", str(path), "--out", "report.txt"]) == 2
    assert ".html" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_write_report_leaves_no_half_file_on_failure(tiny, tmp_path, monkeypatch):
    study, url, _ = tiny
    out = tmp_path / "report.html"
    out.write_text("the previous report")

    def full_disk(*args):
        raise OSError("disk full")

    monkeypatch.setattr("dpnas.analysis.report.os.replace", full_disk)
    with pytest.raises(OSError, match="disk full"):
        write_report(study, out, storage_url=url)
    assert out.read_text() == "the previous report" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_no_browser_is_one_clear_error_before_anything_is_written(tiny, tmp_path, monkeypatch, capsys):
    study, _, path = tiny
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    out = tmp_path / "plots"
    assert main(["plot", str(path), "--out", str(out), "--format", "html,png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "apt-get install chromium" in err and "BROWSER_PATH" in err
    assert not out.exists()
    with pytest.raises(StaticExportError, match="plotly_get_chrome"):
        write_figures({"x": next(iter(study_figures(study).values()))}, out, formats=("html", "svg"))
    assert not out.exists()


# Clicks the objective's header twice after the page loaded (ascending, then descending), recording the order.
_CLICK = """<script>window.addEventListener("load", function () {
  var th = Array.prototype.find.call(document.querySelectorAll("table.sortable th"),
                                     function (h) { return h.textContent === "val_accuracy"; });
  function order() { return Array.prototype.map.call(document.querySelectorAll("table.sortable tbody tr"),
                                                     function (r) { return r.cells[0].textContent; }).join(","); }
  th.click();
  var ascending = order();
  th.click();
  document.body.setAttribute("data-sorted", ascending + ";" + order());
});</script>"""


def test_a_failed_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    study, _, _ = tiny
    monkeypatch.setattr("dpnas.analysis.figures.check_static_export", lambda: "/usr/bin/chromium")

    def browser_died(figures, paths):
        paths[0].write_bytes(b"half a png")
        raise RuntimeError("browser closed unexpectedly")

    monkeypatch.setattr("dpnas.analysis.figures.write_static", browser_died)
    with pytest.raises(StaticExportError, match="browser closed unexpectedly"):
        write_figures(study_figures(study), tmp_path, formats=("html", "png"))
    assert list(tmp_path.iterdir()) == []


@needs_browser
def test_report_renders_in_a_real_browser_without_errors_and_sorts(tiny, page, tmp_path):
    study, _, _ = tiny
    path = tmp_path / "report.html"
    path.write_text(page.replace("</body>", _CLICK + "</body>"), encoding="utf-8")
    dom = _dom(path)
    assert 'data-rendered="ok"' in dom  # no error reached window.onerror
    figures = len(study_figures(study))
    assert int(re.search(r'data-plots="(\d+)"', dom).group(1)) >= figures
    assert len(re.findall(r'<div id="figure-\d+" class="[^"]*js-plotly-plot', dom)) == figures  # each one drawn
    done = sorted((t for t in study.trials if t.values), key=lambda t: t.values[0])
    unscored = [t.number for t in study.trials if not t.values]
    ascending = ",".join(str(n) for n in [t.number for t in done] + unscored)  # blanks last either way
    descending = ",".join(str(n) for n in [t.number for t in reversed(done)] + unscored)
    assert f'data-sorted="{ascending};{descending}"' in dom


@needs_browser
def test_plot_folder_shares_one_plotly_js_and_its_pages_render(tiny, tmp_path):
    study, _, _ = tiny
    figures = study_figures(study)
    written = write_figures(figures, tmp_path, formats=("html",))
    assert [p.name for p in written].count("plotly.min.js") == 1
    assert sum(p.stat().st_size for p in written) < 10_000_000
    dom = _dom(tmp_path / "optuna_history.html")
    assert 'class="main-svg"' in dom and "scatterlayer" in dom  # plotly.js loaded from beside it, data drawn


@needs_browser
def test_png_and_svg_export(tiny, tmp_path):
    study, _, _ = tiny
    name, figure = next(iter(study_figures(study).items()))
    written = write_figures({name: figure}, tmp_path, formats=("png", "svg"))
    assert sorted(p.name for p in written) == [f"{name}.png", f"{name}.svg"]
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "<svg" in (tmp_path / f"{name}.svg").read_text()[:500]


# --- what a review found (2026-12-07) --------------------------------------------------------------------------

def test_report_names_the_study_in_its_commands_and_counts_the_stored_trials(tiny):
    """With --study-name, the printed `dpnas best` fetched the file's own study's weights; the trial count came
    from the file's n_trials, not the study's target (--n-trials, a grid's, an ablation's)."""
    study, url, path = tiny
    named = report_html(study, storage_url=url, where=str(path), named=True)
    assert f"--study-name {study.study_name} --weights best.pt" in named
    assert "--study-name" not in report_html(study, storage_url=url, where=str(path))
    assert ">2 trials, sampler random" in named


def test_titles_carry_no_markup_and_an_ablation_caption_says_what_it_shows():
    import plotly.graph_objects as go

    figure = go.Figure().update_layout(title="activation against the base point<br><sup>mean and 95% t-interval "
                                             "over 2 seeds</sup>")
    assert figure_title(figure, "component_activation") == "activation against the base point"
    caption = figure_caption("component_activation", figure)
    assert "mean over seeds" in caption and "mean and 95% t-interval over 2 seeds" in caption and "<" not in caption


def test_searched_budgets_are_named_as_such(tmp_path, capsys):
    """A study searching epsilon = [4.0, inf] was described as "every trial trains with DP-SGD at ε = 4"."""
    from dpnas.search.study_report import budget_words

    path = write_study(tmp_path, n_trials=2, sampler="grid", extra="")
    path.write_text(unfix(path.read_text(), "epsilon").replace('activation = ["selu", "relu", "mish"]',
                                                               'epsilon = [4.0, inf]'))
    search(load_study_file(path), progress=False)
    study, _ = resolve_study(str(path))
    words = budget_words(study)
    assert "ε searched per trial" in words and "1 trial so far" in words
    # a queued retry carries a copy of its original's settings: it has trained nothing yet
    study.enqueue_trial({}, user_attrs={"privacy_config": {"epsilon": float("inf")}})
    assert budget_words(study) == words
    assert main(["privacy", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] is None and report["protected"] == {"training": False, "validation": False,
                                                                 "dataset": False}


def test_a_companion_joins_the_dp_gap_figure_only(tiny):
    """`dpnas plot --companion` drew every figure from both studies: a non-private companion's trial became the
    private study's Pareto front."""
    from dpnas.analysis.frame import trials_frame

    study, _, _ = tiny
    frame = trials_frame(study)
    extra = frame.copy()
    extra["number"] += 100_000
    extra["private"], extra["val_accuracy"] = False, 0.999
    alone, joined = study_figures(study, frame), study_figures(study, frame, companion=extra)
    assert "dp_gap" in joined and "dp_gap" not in alone
    for name, figure in alone.items():
        if not name.startswith("optuna"):
            assert joined[name].to_json() == figure.to_json(), name


def test_the_recipe_header_says_what_a_retrain_protects():
    """A non-private best trial's recipe said "a new private run", and one with exact validation scores too."""
    from dpnas.arch.registry import MODELS
    from dpnas.dp.config import PrivacyConfig
    from dpnas.dp.recipe_file import RecipeFile
    from dpnas.search.study_report import _what_a_retrain_is

    def words(**privacy):
        return _what_a_retrain_is(RecipeFile(MODELS["tiny"].arch, privacy=PrivacyConfig(**privacy)))

    assert "NON-PRIVATE" in words(epsilon=float("inf"))
    assert "validation records are not protected" in words(epsilon=4.0, val_noise=0)
    assert words(epsilon=4.0) == "a new private run: it spends its own epsilon"
