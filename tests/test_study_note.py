"""The study's note for optuna-dashboard, written with the dashboard's own note module loaded on its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optuna
import pytest

from dpnas.search import study_report


def test_the_note_is_what_the_dashboard_reads_back_and_versions_like_its_own():
    import optuna_dashboard

    study = optuna.create_study()
    note = study_report.dashboard_note_module()
    long_body = "## Privacy\n" + "ε " * 3000  # longer than one system attribute: split and joined again
    note.save_note(study, long_body)
    assert optuna_dashboard.get_note(study) == long_body
    optuna_dashboard.save_note(study, "second")  # the package's own writer continues the same versions
    assert note.get_note(study) == "second"
    note.save_note(study, "third")
    assert optuna_dashboard.get_note(study) == "third"
    assert study._storage.get_study_system_attrs(study._study_id)["dashboard:note_ver"] == 3


def test_writing_the_note_imports_neither_the_dashboard_app_nor_scikit_learn():
    code = textwrap.dedent("""
        import sys
        import optuna
        from dpnas.search.study_report import dashboard_note_module
        study = optuna.create_study()
        dashboard_note_module().save_note(study, "hello")
        loaded = sorted(m for m in ("optuna_dashboard", "sklearn", "optuna_dashboard._app") if m in sys.modules)
        print(",".join(loaded) or "none")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "none"


def test_without_the_note_file_the_package_is_imported_as_usual(monkeypatch):
    study_report.dashboard_note_module.cache_clear()
    monkeypatch.setattr(study_report.importlib.util, "find_spec", lambda name: None)
    try:
        module = study_report.dashboard_note_module()
        assert module.__name__ == "optuna_dashboard._note"
        study = optuna.create_study()
        module.save_note(study, "fallback")
        import optuna_dashboard

        assert optuna_dashboard.get_note(study) == "fallback"
    finally:
        study_report.dashboard_note_module.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_cache():
    study_report.dashboard_note_module.cache_clear()
    yield
    study_report.dashboard_note_module.cache_clear()
