import json
import shutil
import subprocess

import pytest

from dpnas import ArchConfig, build_model, load_arch_file
from dpnas.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_every_reference_with_its_count(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "smoothnet" in out and "3,391,853" in out
    assert "resnet9_scalenorm" in out and "2,448,714" in out
    assert "wrn16_4" in out


def test_describe_json_reports_config_params_and_compatibility(capsys):
    code, out, _ = run(capsys, "describe", "smoothnet", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["params"] == 3_391_853 and info["dp_compatible"] is True
    assert info["output_shape"] == [10] and info["config"] == ArchConfig().to_dict()


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_describe_output_saved_and_described_again_gives_the_same_model(capsys, tmp_path, suffix):
    code, out, _ = run(capsys, "describe", "smoothnet", "--set", "activation=mish", "--set", "groups=4", "--json")
    first = json.loads(out)
    path = tmp_path / f"arch{suffix}"
    if suffix == ".json":
        path.write_text(out)
    else:  # the config as a TOML table, as a user would write it by hand
        lines = [f"{k} = {json.dumps(v)}" for k, v in first["config"].items()]
        path.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "describe", str(path), "--json")
    second = json.loads(out)
    assert code == 0 and second["config"] == first["config"] and second["params"] == first["params"]
    arch = load_arch_file(path)
    assert arch.activation == "mish" and arch.groups == 4
    a = build_model(arch, num_classes=10, in_channels=3).state_dict()
    b = build_model(ArchConfig().replace(activation="mish", groups=4), num_classes=10, in_channels=3).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_describe_text_and_options(capsys):
    code, out, _ = run(capsys, "describe", "resnet9", "--num-classes", "100", "--image-size", "64")
    assert code == 0
    assert "parameters: 2,540,196 (100 classes)" in out  # 2,447,946 + 1024 * 90 + 90
    assert "input (3, 64, 64) -> output (100,)" in out and "opacus: compatible" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["describe", "nonet"], "unknown architecture 'nonet'"),
        (["describe", "smoothnet", "--set", "activation=selu2"], "activation: unknown value 'selu2'"),
        (["describe", "smoothnet", "--set", "colour=red"], "unknown field 'colour'"),
        (["describe", "smoothnet", "--set", "activation"], "expected field=value"),
        (["describe", "smoothnet", "--set", "width=-1"], "width: must be a positive"),
        (["describe", "missing.toml"], "missing.toml: cannot read file"),
        (["describe", "tiny", "--set", "stages=6"], "too small for 6 downsamplings"),
        (["describe", "tiny", "--num-classes", "0"], "num_classes"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and needle in err, err


def test_unreadable_file_content_is_a_user_error(capsys, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("width = [")
    code, _, err = run(capsys, "describe", str(path))
    assert code == 2 and "not valid TOML" in err and err.count("\n") == 1


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["describe", "smoothnet", "--image-size", "big"])
    assert exc.value.code == 2


@pytest.mark.skipif(shutil.which("dpnas") is None, reason="console script not installed")
def test_console_script_is_installed():
    result = subprocess.run(["dpnas", "describe", "tiny", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dp_compatible"] is True


def test_a_warning_is_printed_as_one_line_of_the_command(tmp_path):
    import sys

    import optuna

    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    # its own process: pytest records warnings instead of printing them
    result = subprocess.run([sys.executable, "-m", "dpnas", "plot", storage, "--out", str(tmp_path / "plots"),
                             "--no-attach"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["dpnas plot: warning: study 'empty' has no completed trial: nothing to plot"]


def test_a_search_stopped_before_any_trial_completed_offers_no_export(capsys, tmp_path, monkeypatch):
    # it printed "export the best recipe and its weights: dpnas best ...", which then failed: no completed trial
    import dpnas.search.runner as runner
    from search_helpers import write_study

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", stopped)
    path = write_study(tmp_path, n_trials=2)
    assert main(["search", str(path), "--quiet"]) == 130
    out = capsys.readouterr().out
    assert "interrupted: run the same command again" in out
    assert "export the best recipe" not in out and "no completed trial yet: nothing to export" in out


def test_output_piped_into_a_reader_that_left_is_no_traceback():
    # `dpnas describe smoothnet | head` ended in a BrokenPipeError traceback when head had read its lines
    import sys

    process = subprocess.Popen([sys.executable, "-m", "dpnas", "describe", "smoothnet"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before the command prints
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 141, stderr
    assert stderr == ""


def test_search_check_of_a_study_that_ran_all_its_trials_says_a_search_trains_nothing(capsys, tmp_path):
    # it said "ready to search", while the search then trained nothing ("1 trials finished of a budget of 1")
    from search_helpers import write_study

    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "has run all 1 trials of its budget: a search trains nothing more" in out and "ready to search" not in out
    assert main(["search", str(path), "--check", "--n-trials", "2"]) == 0  # a larger target: there is work
    assert "ready to search" in capsys.readouterr().out


def test_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path):
    import sys

    # a Ctrl-C that lands while `dpnas` imports torch (its first seconds), made certain by an import hook
    script = """
import importlib.abc, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
sys.argv = ["dpnas", "describe", "tiny"]
from dpnas.__main__ import run
sys.exit(run())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (130, "dpnas: interrupted\n", "")


def test_the_console_script_runs_the_interruptible_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "dpnas"]
    assert script.value == "dpnas.__main__:run"
