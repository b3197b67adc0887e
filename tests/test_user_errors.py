"""Every user error is one line on stderr and exit status 2, found before anything is spent (issue 16).

Each case runs the real command line (`dpnas.cli.main`) and checks: status 2, one stderr line naming the problem,
no traceback; a study file refused creates no storage; a `dpnas train` refused loads no data (the loader is
replaced by one that fails the test), so nothing was trained or lost.
"""

from __future__ import annotations

import contextlib
import signal
import types

import pytest
import torch

import dpnas.data.datasets as datasets
import dpnas.dp.checkpoint as checkpoint
import dpnas.search.fidelity as fidelity
from dpnas.arch.footprint import footprint
from dpnas.arch.models import DenseBlock, ResidualBlock, build_model, count_parameters
from dpnas.arch.registry import MODELS, get_arch
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.cli import main
from dpnas.dp.config import MAX_SEED, TrainConfig
from dpnas.dp.memory import check_training_fits
from dpnas.dp.recipes import RECIPES
from dpnas.search.study_file import _choice_key, load_study_file

VALID = """
[study]
n_trials = 2
[data]
dataset = "digits"
[privacy]
epsilon = 8.0
[train]
recipe = "quick"
epochs = 1
[arch]
base = "tiny"
[search]
activation = ["selu", "relu"]
"""


def one_line_error(capsys, argv, needle):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith(f"dpnas {argv[0]}: error: "), err
    assert "Traceback" not in err and needle in err, err
    return err


@pytest.fixture
def no_data(monkeypatch):
    """`dpnas train` must refuse before it loads anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded before the run was refused")

    # and where modules hold it by name (imported above, before any test patches it: a first import under the patch
    # would keep the refusal for the rest of the session)
    for module in (datasets, checkpoint, fidelity):
        monkeypatch.setattr(module, "load_dataset", refuse)


@contextlib.contextmanager
def within(seconds: int):
    """Fail (not hang) when a refusal that should be instant builds a huge model instead."""
    def fail(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused_study(capsys, tmp_path, text, needle, *, raw: bytes | None = None):
    path = tmp_path / "study.toml"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text)
    err = one_line_error(capsys, ["search", str(path), "--quiet"], needle)
    assert str(path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"], "a refused study created storage"
    return err


def edit(old, new):
    text = VALID.replace(old, new, 1)
    assert text != VALID
    return text


# --- 1. files that are not UTF-8 ---------------------------------------------------------------------------

def test_a_study_file_that_is_not_utf8_is_refused(capsys, tmp_path):
    refused_study(capsys, tmp_path, None, "not a text file (not UTF-8", raw=VALID.encode() + b"# \xff\xfe\n")


@pytest.mark.parametrize("command", ["describe", "train"])
def test_arch_and_recipe_files_that_are_not_utf8_are_refused(capsys, tmp_path, no_data, command):
    path = tmp_path / "arch.toml"
    path.write_bytes(b"width = 1.0\n# \xff\n")
    one_line_error(capsys, [command, str(path)], f"{path}: not a text file (not UTF-8)")


BOM = "\ufeff".encode()  # the UTF-8 byte-order mark Windows editors (Notepad) write at the start of a file


def test_a_study_file_with_a_byte_order_mark_is_read_and_recorded_without_it(tmp_path):
    import tomllib

    from dpnas.search.study_state import open_study

    plain, marked = tmp_path / "plain.toml", tmp_path / "marked.toml"
    plain.write_text(VALID)
    marked.write_bytes(BOM + VALID.encode())
    spec = load_study_file(marked)  # was: "not valid TOML: Invalid statement (at line 1, column 1)"
    assert spec.axes == load_study_file(plain).axes and spec.n_trials == 2
    # the text the study records is the one that was parsed: the report and `dpnas privacy` parse it again
    recorded = open_study(spec, str(tmp_path / "marked.journal")).user_attrs["study_file"]
    assert recorded == VALID and tomllib.loads(recorded)["privacy"] == {"epsilon": 8.0}


@pytest.mark.parametrize("suffix, text", [(".toml", 'width = 2.0\nactivation = "mish"\n'),
                                          (".json", '{"width": 2.0, "activation": "mish"}')])
def test_arch_and_recipe_files_with_a_byte_order_mark_are_read(tmp_path, suffix, text):
    from dpnas.arch.space import load_arch_file
    from dpnas.dp.recipe_file import load_recipe_file

    path = tmp_path / f"arch{suffix}"
    path.write_bytes(BOM + text.encode())
    assert load_arch_file(path) == ArchConfig(width=2.0, activation="mish")
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(BOM + b'[arch]\nwidth = 2.0\n[train]\nepochs = 3\n')
    assert load_recipe_file(recipe).arch.width == 2.0


# --- 2. a list or another type where a name or a scalar is expected --------------------------------------

@pytest.mark.parametrize("old, new, needle", [
    ('base = "tiny"', 'base = ["tiny"]', "arch.base: unknown architecture ['tiny']"),
    ('recipe = "quick"', 'recipe = ["quick"]', "train.recipe: unknown recipe ['quick']"),
    ('recipe = "quick"', "recipe = 3", "train.recipe: unknown recipe 3"),
    ('dataset = "digits"', 'dataset = ["digits"]', "data.dataset: expected str"),
    ("n_trials = 2", 'n_trials = 2\nsampler = ["tpe"]', "study.sampler: expected str"),
    ("n_trials = 2", 'n_trials = 2\npruner = ["none"]', "study.pruner: expected str"),
    ("n_trials = 2", 'n_trials = 2\ntrial_count = ["fixed"]', "study.trial_count: expected str"),
    ("n_trials = 2", 'n_trials = 2\nobjectives = [["val_accuracy"]]', "study.objectives: unknown objective"),
    ("n_trials = 2", "n_trials = 2\nobjectives = [1]", "study.objectives: unknown objective 1"),
    ('base = "tiny"', 'base = "tiny"\nwidth = [1.0]', "[arch] width: expected a number, got [1.0]"),
    ('base = "tiny"', 'base = "tiny"\nactivation = ["relu"]', "[arch] activation: expected a string"),
    ('base = "tiny"', 'base = "tiny"\nhead_hidden = [[8]]', "[arch] head_hidden: expected a list of numbers"),
    ("epochs = 1", "epochs = [1]", "[train] epochs: expected an integer, got [1]"),
    ("epochs = 1", 'epochs = 1\noptimizer = ["sgd"]', "[train] optimizer: expected a string"),
    ("epsilon = 8.0", "epsilon = [8.0]", "[privacy] epsilon: expected a number"),
])
def test_wrong_types_in_a_study_file_are_refused(capsys, tmp_path, old, new, needle):
    refused_study(capsys, tmp_path, edit(old, new), needle)


# --- 3. seeds: integers from 0 to 2**63 - 1 --------------------------------------------------------------

@pytest.mark.parametrize("old, new, needle", [
    ("epochs = 1", "epochs = 1\nseed = -1", "[train] seed: must be an integer from 0 to 2**63 - 1, got -1"),
    ("n_trials = 2", "n_trials = 2\nseed = -1", "study.seed: must be an integer from 0 to 2**63 - 1, got -1"),
])
def test_negative_seeds_in_a_study_file_are_refused(capsys, tmp_path, old, new, needle):
    refused_study(capsys, tmp_path, edit(old, new), needle)


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--set", "seed=-1"], ["--seed", str(2**64)]])
def test_out_of_range_seeds_on_the_command_line_are_refused(capsys, no_data, argv):
    one_line_error(capsys, ["train", "tiny", "--quiet", *argv], "seed: must be an integer from 0 to 2**63 - 1")


def test_the_largest_seed_is_accepted_and_torch_takes_it_and_the_loop_s_offsets():
    assert TrainConfig(seed=MAX_SEED).seed == MAX_SEED and TrainConfig(seed=0).seed == 0
    torch.Generator().manual_seed(MAX_SEED + 4)  # train() seeds its other generators with seed + 1 .. seed + 4


def test_a_negative_split_seed_in_a_recipe_file_is_refused(capsys, tmp_path, no_data):
    path = tmp_path / "recipe.toml"
    path.write_text('[arch]\nwidth = 1.0\nhead_hidden = [32]\n[data]\ndataset = "digits"\nsplit_seed = -3\n')
    one_line_error(capsys, ["train", str(path)], "data.split_seed: must be an integer from 0 to 2**63 - 1, got -3")


@pytest.mark.parametrize("data, needle", [
    ('dataset = "digits"\ndata_dir = "/tmp"', "data.data_dir: digits needs no files"),  # was silently unused
    ('dataset = "cifar10"\ndata_dir = ""', "data.data_dir: must not be empty"),  # was the current directory
    ('dataset = "digits"\nval_fraction = 0.2', "train.val_fraction: 0.5 differs from [data] val_fraction = 0.2"),
])
def test_a_recipe_s_data_settings_that_nothing_would_read_are_refused(capsys, tmp_path, no_data, data, needle):
    path = tmp_path / "recipe.toml"
    path.write_text(tiny_arch_table() + f"\n[train]\nval_fraction = 0.5\n[data]\n{data}\n")
    one_line_error(capsys, ["train", str(path)], needle)


# --- 4. trial-count parameters and timeouts: finite, and only where they apply -----------------------------

@pytest.mark.parametrize("new, needle", [
    ('trial_count = "poisson"\nmean_trials = inf', "study.mean_trials: must be a finite number, got inf"),
    ('trial_count = "poisson"\nmean_trials = nan', "study.mean_trials: must be a finite number, got nan"),
    ('trial_count = "truncated_negative_binomial"\neta = inf\ngamma = 0.5', "study.eta: must be a finite number"),
    ('trial_count = "truncated_negative_binomial"\neta = nan\ngamma = 0.5', "study.eta: must be a finite number"),
    ('trial_count = "truncated_negative_binomial"\neta = 1\ngamma = nan', "study.gamma: must be a finite number"),
    ("n_trials = 2\nmean_trials = 4.0", 'study.mean_trials: only for trial_count = "poisson"'),
    ('trial_count = "poisson"\nmean_trials = 4.0\neta = 1', 'study.eta: only for trial_count = "truncated_negative'),
    ("n_trials = 2\ntimeout = nan", "study.timeout: must be a finite number of seconds > 0, got nan"),
    ("n_trials = 2\ntimeout = inf", "study.timeout: must be a finite number of seconds > 0, got inf"),
])
def test_trial_count_parameters_are_refused_at_load_time(capsys, tmp_path, new, needle):
    refused_study(capsys, tmp_path, edit("n_trials = 2", new), needle)


# --- 5. dpnas train: device and sizes refused before any data is loaded ------------------------------------

@pytest.mark.parametrize("device, needle", [
    ("cudaa", "--device 'cudaa': not a device; expected cpu, cuda or cuda:N"),
    ("meta", "--device 'meta': dpnas trains on cpu or cuda"),
    ("cuda:99", "--device 'cuda:99': "),
])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_devices_are_refused_before_loading(capsys, no_data, tmp_path, command, device, needle):
    target = "tiny" if command == "train" else str(tmp_path / "missing.pt")
    one_line_error(capsys, [command, target, "--device", device], needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line(capsys, no_data):
    one_line_error(capsys, ["train", "tiny", "--device", "cuda"], "CUDA is not available here")


@pytest.mark.parametrize("argv, needle", [
    (["--image-size", "100000"], "this run needs at least"),
    (["--image-size", "0"], "--image-size: must be >= 1"),
    (["--set", "width=1e6"], "parameters with their gradient and optimiser state"),
    (["--set", "depth=1e6"], "depth: 2,000,000 convolutions in the blocks"),
    (["--set", "stages=40"], "stages: at most 16"),
    (["--set", "width=1e18"], "a layer's size overflows 64 bits"),  # torch's own words were a C++ trace
    (["--set", "head_pool_size=9223372036854775807"], "a layer's size overflows 64 bits"),
    (["--set", "weight_decay=nan"], "weight_decay: must be a finite number >= 0"),  # torch.optim's ValueError
])
def test_sizes_that_cannot_be_allocated_are_refused_up_front(capsys, no_data, argv, needle):
    with within(60):
        one_line_error(capsys, ["train", "tiny", "--quiet", "--device", "cpu", *argv], needle)


def test_a_depth_that_cannot_be_built_is_refused_by_describe_too(capsys):
    with within(60):
        one_line_error(capsys, ["describe", "tiny", "--set", "depth=1e6"], "dpnas builds at most 2,000")


def test_describe_of_a_huge_input_allocates_nothing(capsys):
    assert main(["describe", "tiny", "--image-size", "100000", "--json"]) == 0
    assert '"activations_per_sample"' in capsys.readouterr().out


def test_a_usual_run_is_not_refused():
    estimate = check_training_fits(get_arch("smoothnet"), RECIPES["smoothnet"].train, dataset="cifar10",
                                   image_size=None, device=torch.device("cpu"))
    assert estimate.params == 3_391_853 and estimate.dataset_bytes == 60_000 * 3 * 32 * 32


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels, image_size", [(3, 32), (1, 37)])
def test_the_footprint_matches_a_real_forward_pass(name, in_channels, image_size):
    """The estimate behind the refusal: parameters, output shape and activations as a real model has them."""
    arch = MODELS[name].arch
    size = footprint(arch, num_classes=7, in_channels=in_channels, image_size=image_size)
    model = build_model(arch, num_classes=7, in_channels=in_channels, image_size=image_size)
    produced = [in_channels * image_size**2]
    for module in model.modules():
        leaf = not list(module.children()) and not isinstance(module, torch.nn.Identity)
        if leaf or isinstance(module, (ResidualBlock, DenseBlock)):  # a merge makes a tensor of its own
            module.register_forward_hook(lambda m, i, o: produced.append(o[0].numel()))
    with torch.no_grad():
        out = model(torch.zeros(2, in_channels, image_size, image_size))
    assert size.params == count_parameters(model)
    assert size.output_shape == tuple(out.shape[1:]) and size.activations == sum(produced)


# --- 6. output paths checked before training ----------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--out", "--weights"])
@pytest.mark.parametrize("where", ["proc", "directory", "under_a_file"])
def test_unwritable_output_paths_are_refused_before_training(capsys, no_data, tmp_path, flag, where):
    (tmp_path / "a_file").write_text("x")
    path = {"proc": "/proc/dpnas-test/x.json", "directory": str(tmp_path),
            "under_a_file": str(tmp_path / "a_file" / "x.json")}[where]
    one_line_error(capsys, ["train", "tiny", "--quiet", flag, path], f"{flag} {path}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# --- 7. smaller gaps ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, needle", [
    ('activation = ["selu", "relu"]', "width = [1, 1.0]", "search.width: choices must be distinct"),
    ("n_trials = 2", 'n_trials = 2\nname = ""', "study.name: must not be empty"),
    ("n_trials = 2", 'n_trials = 2\nname = "   "', "study.name: must not be empty"),
    ("n_trials = 2", "n_trials = 2\nheartbeat_interval = -1", "study.heartbeat_interval: must be >= 0"),
    ("n_trials = 2", "n_trials = 2\ngrace_period = -5", "study.grace_period: must be >= 1"),
    ("n_trials = 2", "n_trials = 2\nmax_retries = -1", "study.max_retries: must be >= 0"),
    ('dataset = "digits"', 'dataset = "digits"\nimage_size = 100000', "data.image_size: digits at 100000x100000"),
    ('dataset = "digits"', 'dataset = "digits"\nimage_size = 0', "data.image_size: must be >= 1"),
])
def test_smaller_gaps_in_study_files_are_refused(capsys, tmp_path, old, new, needle):
    refused_study(capsys, tmp_path, edit(old, new), needle)


def test_a_missing_cifar10_data_dir_in_a_study_file_is_refused(capsys, tmp_path):
    missing = tmp_path / "no-such-data"
    text = edit('dataset = "digits"', f'dataset = "cifar10"\ndata_dir = "{missing}"')
    refused_study(capsys, tmp_path, text, "data.data_dir: ")
    assert not missing.exists()


def test_a_missing_cifar10_data_dir_is_reported_not_created(capsys, tmp_path):
    missing = tmp_path / "typo"
    one_line_error(capsys, ["train", "tiny", "--quiet", "--dataset", "cifar10", "--data-dir", str(missing)],
                   f"data_dir {missing} does not exist")
    assert not missing.exists()


def test_equal_numbers_are_one_choice_but_true_is_not_one():
    assert _choice_key(1) == _choice_key(1.0) and _choice_key(True) != _choice_key(1)
    assert _choice_key(False) != _choice_key(0) and _choice_key("1") != _choice_key(1)


def test_a_valid_study_still_loads(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(edit("n_trials = 2", 'n_trials = 2\nheartbeat_interval = 0\nmax_retries = 0\nseed = 7'))
    spec = load_study_file(path)
    assert spec.seed == 7 and spec.heartbeat_interval == 0 and spec.max_retries == 0


def test_structure_bounds_are_checked_by_the_config_itself():
    with pytest.raises(ConfigError, match="stages: at most 16"):
        ArchConfig(stages=17)
    with pytest.raises(ConfigError, match="dpnas builds at most 2,000"):
        ArchConfig(depth=5.0, block_convs=300)


# --- 8. what a review found (2026-12-07): outputs, recipes with fixed noise, damaged checkpoints ---------------

def test_two_outputs_naming_one_file_are_refused_before_training(capsys, no_data, tmp_path):
    same = str(tmp_path / "x.out")
    one_line_error(capsys, ["train", "tiny", "--quiet", "--out", same, "--weights", same], "name the same file")


def test_best_refuses_its_outputs_before_writing_either(capsys, tmp_path):
    from search_helpers import write_study

    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    capsys.readouterr()
    same = str(tmp_path / "best.out")
    one_line_error(capsys, ["best", str(path), "--out", same, "--weights", same], "name the same file")
    one_line_error(capsys, ["best", str(path), "--out", str(tmp_path / "b.toml"), "--weights", str(tmp_path)],
                   "is a directory")
    assert not (tmp_path / "b.toml").exists() and not list(tmp_path.glob("*.partial"))


def test_reproduce_into_a_file_is_refused_before_the_data(capsys, no_data, tmp_path):
    (tmp_path / "a_file").write_text("x")
    one_line_error(capsys, ["reproduce", "smoothnet", "--quick", "--out-dir", str(tmp_path / "a_file")],
                   "is a file, not a folder")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--models", "tiny", "--device", "cuda:3"], "--device 'cuda:3'"),
    (["bench", "--models", "tiny", "--device", "gpu"], "--device 'gpu'"),
    (["dashboard", "x.journal", "--port", "70000"], "--port: must be from 0 to 65535"),
])
def test_bad_ports_and_devices_are_one_line(capsys, argv, needle):
    one_line_error(capsys, argv, needle)


def test_plot_into_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "README.md").write_text("x")
    one_line_error(capsys, ["plot", str(tmp_path / "study.toml"), "--out", str(tmp_path / "README.md")],
                   "is a file; give a folder")


def test_a_val_fraction_set_twice_differently_in_a_study_is_refused(capsys, tmp_path):
    refused_study(capsys, tmp_path, edit("epochs = 1", "epochs = 1\nval_fraction = 0.5").replace(
        'dataset = "digits"', 'dataset = "digits"\nval_fraction = 0.2'), "train.val_fraction: 0.5 differs")


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "nan"])
def test_a_bad_data_val_fraction_in_a_study_names_the_data_key(capsys, tmp_path, value):
    # it was copied into [train] first and refused there as "[train] val_fraction", a key the file does not have
    err = refused_study(capsys, tmp_path, edit('dataset = "digits"', f'dataset = "digits"\nval_fraction = {value}'),
                        "data.val_fraction: must be in [0, 1)")
    assert "[train]" not in err


@pytest.mark.parametrize("line, needle", [
    ("val_fraction = 1.5", "data.val_fraction: must be in [0, 1), got 1.5"),
    ("val_fraction = nan", "data.val_fraction: must be in [0, 1), got nan"),
    ("image_size = 0", "data.image_size: must be >= 1, got 0"),
])
@pytest.mark.parametrize("command", ["train", "describe"])
def test_bad_data_settings_in_a_recipe_file_name_the_file_and_the_key(capsys, tmp_path, no_data, command, line,
                                                                       needle):
    # were refused later as a bare "val_fraction: ..." (read as the --val-fraction flag) or "image_size must be ..."
    path = tmp_path / "recipe.toml"
    path.write_text(f'[arch]\nwidth = 1.0\nhead_hidden = [32]\n[data]\ndataset = "digits"\n{line}\n')
    one_line_error(capsys, [command, str(path)], f"{path}: {needle}")


def tiny_arch_table() -> str:
    from dpnas.dp.recipe_file import _table

    return "\n".join(_table("arch", MODELS["tiny"].arch.to_dict()))


RECIPE_WITH_FIXED_NOISE = """
[train]
epochs = 1
batch_size = 256
physical_batch_size = 320
[privacy]
epsilon = 6.0
delta = 1e-5
noise_multiplier = {sigma}
val_noise = {val_noise}
"""


@pytest.mark.parametrize("flags, needle", [
    (["--epsilon", "30"], "the recipe fixes noise_multiplier = 3"),
    (["--set", "delta=1e-6"], "the recipe fixes noise_multiplier = 3"),
    (["--epochs", "40", "--set", "noise_multiplier=0"], "val_noise: 2 on the correct count over 40 validation"),
    # a lower ε with the noise derived afresh kept the recipe's val_noise: the validation records got ε 2.17 > 0.5
    (["--epsilon", "0.5", "--set", "noise_multiplier=0"], "val_noise: 2 on the correct count over 1 validation"),
    (["--set", "delta=1e-9", "--set", "noise_multiplier=0", "--epsilon", "1"], "val_noise: 2 on the correct count"),
])
def test_a_recipe_whose_fixed_noise_misses_the_budget_asked_for_is_refused(capsys, no_data, tmp_path, flags, needle):
    """A recipe from a total-ε study fixes the noise its study derived: a new --epsilon used to leave it in place
    silently, and a val_noise derived for 1 release, reused over 40, cost the validation records more than ε."""
    from dpnas.dp.privacy import validation_epsilon

    path = tmp_path / "best.toml"
    path.write_text(tiny_arch_table() + RECIPE_WITH_FIXED_NOISE.format(sigma=3.0, val_noise=2.0))
    assert validation_epsilon(2.0, 40, 1e-5) > 6.0 >= validation_epsilon(2.0, 1, 1e-5)
    one_line_error(capsys, ["train", str(path), "--quiet", *flags], needle)


@pytest.mark.parametrize("flags", [["--no-dp"], ["--set", "epsilon=inf"]])
def test_a_search_recipe_trained_without_dp_has_exact_scores_and_claims_no_epsilon(capsys, tmp_path, flags):
    """--no-dp kept a search recipe's fixed val_noise: the scores of a non-private run were blurred and its last
    line gave an epsilon "for the validation records" next to "non-private"."""
    import json

    path = tmp_path / "best.toml"
    path.write_text(tiny_arch_table() + RECIPE_WITH_FIXED_NOISE.format(sigma=3.0, val_noise=2.0))
    out = tmp_path / "r.json"
    assert main(["train", str(path), "--quiet", "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    assert "(exact), test accuracy" in printed and "non-private" in printed, printed
    assert "epsilon" not in printed and "noisy" not in printed, printed
    result = json.loads(out.read_text())
    assert result["private"] is False and result["val_noise"] == 0 and result["validation_epsilon"] is None
    # an explicit validation noise is still the user's to ask for
    assert main(["train", str(path), "--quiet", "--out", str(out), *flags, "--set", "val_noise=2.0"]) == 0
    assert json.loads(out.read_text())["val_noise"] == 2.0


def test_a_recipe_file_with_some_sections_keeps_them(capsys, tmp_path):
    """A recipe file with [arch] and [privacy] but no [train] used to have its [privacy] dropped for the default
    recipe's (ε = 8 at δ = 1e-5, where the file asked for ε = 2 at δ = 1e-6)."""
    import json

    path = tmp_path / "partial.toml"
    path.write_text(tiny_arch_table() + '[privacy]\nepsilon = 2.0\ndelta = 1e-6\n')
    out = tmp_path / "r.json"
    assert main(["train", str(path), "--quiet", "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["epsilon_target"] == 2.0 and result["delta"] == 1e-6 and result["recipe"] == str(path)
    assert 0 < result["validation_epsilon"] <= 2.0 and "for the validation records" in capsys.readouterr().out


def test_a_checkpoint_with_damaged_bytes_is_refused(capsys, tmp_path):
    """torch.load does not check the zip entries' CRCs: flipped bytes inside a tensor loaded as other weights."""
    import zipfile

    path = tmp_path / "w.pt"
    assert main(["train", "tiny", "--quiet", "--epochs", "1", "--out", str(tmp_path / "r.json"),
                 "--weights", str(path)]) == 0
    assert main(["evaluate", str(path)]) == 0
    capsys.readouterr()
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda e: e.file_size)
    raw = bytearray(path.read_bytes())
    middle = entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + entry.file_size // 2
    raw[middle] ^= 0xFF
    path.write_bytes(bytes(raw))
    one_line_error(capsys, ["evaluate", str(path)], "damaged")


@pytest.mark.parametrize("flags", [["--seed", "3"], ["--set", "seed=3"]])
def test_a_new_seed_resplits_a_recipe_s_data_however_it_is_given(tmp_path, monkeypatch, flags):
    """`--seed 3` re-split a recipe's data and `--set seed=3` kept the recorded split: the same run, two splits."""
    from dpnas.dp.recipe_file import DataSettings, RecipeFile, write_recipe

    recipe = RecipeFile(MODELS["tiny"].arch, RECIPES["quick"].train, RECIPES["quick"].privacy,
                        DataSettings(dataset="digits", split_seed=0))
    path = write_recipe(recipe, tmp_path / "r.toml")
    seen = []

    class Loaded(Exception):
        pass

    def record(name, **kwargs):
        seen.append(kwargs["seed"])
        raise Loaded  # enough: the split it would load

    monkeypatch.setattr(datasets, "load_dataset", record)
    with pytest.raises(Loaded):
        main(["train", str(path), "--quiet", *flags])
    assert seen == [3]


def test_a_dataset_name_in_another_case_is_the_same_dataset(capsys, no_data, tmp_path, monkeypatch):
    """`--dataset Digits` loaded digits, but slipped past the --data-dir check (ignored silently) and, against a
    recipe recorded on "digits", dropped its recorded split and image size: another split than `--dataset digits`."""
    one_line_error(capsys, ["train", "tiny", "--quiet", "--dataset", "Digits", "--data-dir", str(tmp_path)],
                   "--data-dir: digits needs no files")
    from dpnas.dp.recipe_file import DataSettings, RecipeFile, write_recipe

    recipe = RecipeFile(MODELS["tiny"].arch, RECIPES["quick"].train, RECIPES["quick"].privacy,
                        DataSettings(dataset="digits", split_seed=5, image_size=16))
    path = write_recipe(recipe, tmp_path / "r.toml")
    seen = []

    class Loaded(Exception):
        pass

    def record(name, **kwargs):
        seen.append((name, kwargs["seed"], kwargs["image_size"]))
        raise Loaded

    monkeypatch.setattr(datasets, "load_dataset", record)
    for spelling in ("digits", " Digits"):
        with pytest.raises(Loaded):
            main(["train", str(path), "--quiet", "--dataset", spelling, "--out", str(tmp_path / "out.json")])
    assert seen == [("digits", 5, 16)] * 2


def test_a_data_dir_for_data_that_needs_no_files_is_refused(capsys, no_data, tmp_path):
    """digits are bundled and synthetic data generated: a --data-dir or [data] data_dir was ignored silently."""
    one_line_error(capsys, ["train", "tiny", "--quiet", "--data-dir", str(tmp_path)], "--data-dir: digits needs no files")
    refused_study(capsys, tmp_path, edit('dataset = "digits"', f'dataset = "digits"\ndata_dir = "{tmp_path}"'),
                  "data.data_dir: digits needs no files")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--models", "tiny", "--modes", ","], "--modes and --variants must each name at least one"),
    (["bench", "--models", "tiny", "--variants", ","], "--modes and --variants must each name at least one"),
    (["bench", "--models", "tiny", "--modes", "opacus", "--variants", "bf16"], "Opacus's modes run in fp32 only"),
])
def test_bench_arguments_that_select_nothing_are_refused(capsys, argv, needle):
    one_line_error(capsys, argv, needle)


def test_reproduce_into_a_folder_that_cannot_be_made_is_refused_before_the_data(capsys, no_data, tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    one_line_error(capsys, ["reproduce", "smoothnet", "--quick", "--out-dir", str(tmp_path / "gone" / "runs")],
                   "is a link to nothing")
    one_line_error(capsys, ["reproduce", "smoothnet", "--quick", "--out-dir", str(tmp_path / ("x" * 300))],
                   "--out-dir")


def test_evaluate_refuses_a_dataset_of_other_channels_before_loading_it(capsys, tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    assert main(["train", "tiny", "--quiet", "--epochs", "1", "--out", str(tmp_path / "r.json"),
                 "--weights", str(path)]) == 0
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded before the checkpoint was refused")

    import dpnas.dp.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "load_dataset", refuse)
    one_line_error(capsys, ["evaluate", str(path), "--dataset", "cifar10"], "1-channel images, but cifar10 has 3")


# --- 9. a user's walk through the README (2026-12-07) ------------------------------------------------------------

def test_an_output_that_names_the_command_s_input_is_refused(capsys, no_data, monkeypatch, tmp_path):
    """`train RECIPE --weights RECIPE` replaced the recipe with a checkpoint; `best --out` the study's storage."""
    from search_helpers import write_study

    recipe = tmp_path / "arch.toml"
    recipe.write_text('activation = "relu"\n')
    before = recipe.read_bytes()
    for flag in ("--weights", "--out"):
        one_line_error(capsys, ["train", str(recipe), "--quiet", flag, str(recipe)], "this command reads")
    assert recipe.read_bytes() == before
    monkeypatch.undo()  # refused before any data; the search below trains
    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    capsys.readouterr()
    journal = tmp_path / "tiny.journal"
    kept = {p: p.read_bytes() for p in (path, journal)}
    for argv in (["best", str(path), "--out", str(path)], ["best", str(path), "--out", str(journal)],
                 ["best", str(journal), "--out", str(tmp_path / "b.toml"), "--weights", str(journal)]):
        one_line_error(capsys, argv, "this command reads")
    assert {p: p.read_bytes() for p in kept} == kept and not (tmp_path / "b.toml").exists()
    assert main(["best", str(path), "--out", str(tmp_path / "b.toml")]) == 0  # another path is fine


@pytest.mark.parametrize("command", ["search", "best", "privacy", "plot", "report"])
def test_a_blank_study_name_is_refused_not_replaced_by_the_default(capsys, tmp_path, command):
    path = tmp_path / "study.toml"
    path.write_text(VALID)
    for blank in ("", " "):
        with pytest.raises(SystemExit) as exit:  # refused by the parser, as every other bad flag
            main([command, str(path), "--study-name", blank])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and "--study-name: must not be empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"]


def test_the_library_refuses_a_blank_study_name_too(tmp_path):
    from dpnas.search.runner import search

    path = tmp_path / "study.toml"
    path.write_text(VALID)
    with pytest.raises(ConfigError, match="--study-name: must not be empty"):
        search(load_study_file(path), study_name="", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"]


def test_ctrl_c_before_the_study_exists_is_an_interruption_not_a_storage_error(capsys, tmp_path, monkeypatch):
    from dpnas.search import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "search", interrupted)
    path = tmp_path / "study.toml"
    path.write_text(VALID)
    assert main(["search", str(path)]) == 130
    out, err = capsys.readouterr()
    assert err.strip() == "dpnas search: interrupted" and "journal" not in out + err


def test_every_command_s_summary_is_a_whole_sentence(capsys):
    from dpnas.cli import COMMANDS, make_parser

    with pytest.raises(SystemExit):
        make_parser().parse_args(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    for command in COMMANDS:
        first = " ".join((command.__doc__ or "").strip().split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        assert f"{first}." in listing, command.name  # the first line alone stopped mid-sentence ("... as a")


def test_evaluate_refuses_a_data_dir_its_dataset_does_not_read(capsys, tmp_path):
    from dpnas.dp.checkpoint import checkpoint_dict, save_checkpoint
    from dpnas.dp.config import PrivacyConfig
    from dpnas.dp.recipe_file import DataSettings

    arch = get_arch("tiny")
    shape = types.SimpleNamespace(num_classes=10, in_channels=1, image_size=16)
    checkpoint = checkpoint_dict(build_model(arch, num_classes=10, in_channels=1), arch=arch, train_cfg=TrainConfig(),
                                 privacy=PrivacyConfig(), data=shape, data_settings=DataSettings(dataset="digits"),
                                 results={})
    weights = save_checkpoint(checkpoint, tmp_path / "w.pt")
    one_line_error(capsys, ["evaluate", str(weights), "--data-dir", str(tmp_path)], "--data-dir: digits needs no files")
    # the name in any case is the same dataset, as `dpnas train` takes it (it was "unknown dataset 'Digits'")
    one_line_error(capsys, ["evaluate", str(weights), "--dataset", " Digits", "--data-dir", str(tmp_path)],
                   "--data-dir: digits needs no files")


@pytest.mark.parametrize("section, line", [("[arch]", 'activation = "relu"'), ("[privacy]", "max_grad_norm = 1.0"),
                                           ("[train]", "lr = 0.01")])
def test_a_field_both_fixed_and_searched_is_refused_unless_an_ablation_reads_it(capsys, tmp_path, section, line):
    """The searched value always won and the fixed one was dropped silently (README: nothing is ignored)."""
    key = line.split(" = ")[0]
    searched = {"activation": "", "max_grad_norm": "max_grad_norm = [0.5, 2.0]\n", "lr": "lr = [5e-3, 3e-2]\n"}[key]
    text = edit(section, f"{section}\n{line}").replace("[search]\n", f"[search]\n{searched}")
    refused_study(capsys, tmp_path, text, f"{section.strip('[]')}.{key}: is searched too ([search] {key})")
    ablation = text.replace("n_trials = 2\n", 'sampler = "ablation"\n')
    (tmp_path / "ablation.toml").write_text(ablation)  # its base point: the fixed value is read
    spec = load_study_file(tmp_path / "ablation.toml")
    assert str(getattr({"[arch]": spec.arch, "[train]": spec.train, "[privacy]": spec.privacy}[section], key)) \
        == line.split(" = ")[1].strip('"')


def test_the_shipped_studies_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "studies").glob("*.toml")):
        load_study_file(path)


def test_a_retrained_recipe_s_checkpoint_states_the_search_s_epsilon(capsys, tmp_path):
    """`dpnas train best.toml --weights w.pt` then `dpnas evaluate w.pt` printed only the retrain's own ε: the
    search that chose the recipe on the same records (its ε in the recipe's provenance) was dropped."""
    from dpnas.dp.checkpoint import load_checkpoint

    path = tmp_path / "best.toml"
    path.write_text(tiny_arch_table() + '\n[data]\ndataset = "digits"\nimage_size = 16\n\n[provenance]\n'
                    'study = "s"\ntrial = 3\nsearch_epsilon = 7.5\nsearch_delta = 1e-05\n')
    weights = tmp_path / "w.pt"
    assert main(["train", str(path), "--quiet", "--epochs", "1", "--out", str(tmp_path / "r.json"),
                 "--weights", str(weights)]) == 0
    provenance = load_checkpoint(weights)["provenance"]
    assert provenance["search_epsilon"] == 7.5 and provenance["study"] == "s"
    capsys.readouterr()
    assert main(["evaluate", str(weights)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "by its run" in line and "7.500" in line and "study 's'" in line, line
    # on other data the search's records are not the run's: nothing to add there
    other = tmp_path / "o.pt"
    assert main(["train", str(path), "--quiet", "--epochs", "1", "--dataset", "synthetic",
                 "--out", str(tmp_path / "o.json"), "--weights", str(other)]) == 0
    assert "search_epsilon" not in load_checkpoint(other)["provenance"]


def test_evaluate_says_a_reproducible_run_s_model_is_not_protected(capsys, tmp_path):
    """A model trained with reproducible = true (noise regenerable from the stored seed) was scored with its ε and
    the search's as if it were private, without the README's warning that it must be retrained before release."""
    import json

    weights = tmp_path / "w.pt"
    assert main(["train", "tiny", "--quiet", "--epochs", "1", "--image-size", "16", "--set", "reproducible=true",
                 "--out", str(tmp_path / "r.json"), "--weights", str(weights)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "reproducible = true" in out and "retrain" in out, out
    assert main(["evaluate", str(weights), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reproducible"] is True


@pytest.mark.parametrize("argv", [
    ["train", "tiny", "--out", ""], ["train", "tiny", "--weights", " "], ["search", "study.toml", "--storage", ""],
    ["search", "study.toml", "--artifacts", ""], ["best", "study.toml", "--out", ""],
])
def test_a_blank_path_flag_is_refused_not_read_as_the_default(capsys, no_data, argv):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "must not be empty" in err, err


def test_a_study_name_is_printable_and_its_plots_stay_under_runs(capsys, tmp_path):
    """A NUL or a zero-width space made a name no one can type back; a "/" or ".." in a name put `dpnas plot`'s
    default folder outside runs/."""
    import optuna
    from search_helpers import write_study

    from dpnas.analysis.figures import default_plot_dir

    with pytest.raises(SystemExit) as exit:
        main(["search", "study.toml", "--study-name", "a\u200bb"])
    assert exit.value.code == 2 and "must be printable characters" in capsys.readouterr().err
    path = write_study(tmp_path, n_trials=1)
    path.write_text(path.read_text().replace('name = "tiny"', 'name = "a\\u0000b"'))
    one_line_error(capsys, ["search", str(path), "--quiet"], "study.name: must be printable characters")
    study = optuna.create_study(study_name="../../elsewhere x")
    assert default_plot_dir(study).parts == ("runs", "plots-_.._elsewhere_x")


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_a_dashboard_port_in_use_or_an_unknown_host_is_one_line(capsys, tmp_path, monkeypatch, host):
    # running `dpnas dashboard` twice was a traceback (OSError: Address already in use) after its banner
    import socket

    import optuna
    import optuna_dashboard

    def server(storage, *, host, port, artifact_store):  # binds as the real one does, and never serves
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))

    monkeypatch.setattr(optuna_dashboard, "run_server", server)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=storage)
    capsys.readouterr()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:  # the first dashboard
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(capsys, ["dashboard", storage, "--host", host, "--port", port], "cannot listen there")
