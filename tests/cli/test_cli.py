"""The ``autobatch`` command (autobatch.cli): fit, probe and tune, and how a bad setting is
reported (one line, exit status 2)."""

import functools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

import autobatch
from autobatch.cli import main
from autobatch.memory.probe import probe_memory


@pytest.mark.slow
def test_version_and_help_from_the_console_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "autobatch", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"autobatch {autobatch.__version__}"
    help_text = subprocess.run(
        [sys.executable, "-m", "autobatch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: autobatch" in help_text


def test_main_without_a_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "usage: autobatch" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_command_trains_a_built_in_example_and_writes_plot_and_history(tmp_path, capsys) -> None:
    import json

    code = main(["fit", "--problem", "synthetic", "--max-steps", "40", "--no-progress",
                 "--out", str(tmp_path), "--max-lr-factor", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "steps=40" in out and "batch size: 16" in out
    history = json.loads((tmp_path / "synthetic-budget.json").read_text())
    assert len(history["history"]) == 40 and history["steps"] == 40
    assert (tmp_path / "synthetic-budget.png").stat().st_size > 10_000


# -- bad settings: one line on stderr, exit status 2, nothing replaced ---------------------------
def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    """main's exit status (argparse's own errors exit through SystemExit) and its stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


FIT = ["fit", "--problem", "synthetic", "--max-steps", "2", "--no-progress"]
# the synthetic example's linear model trains at batch 9 in 921 bytes; the CNN needs 95,744 at 1
FIT_CNN = ["fit", "--problem", "mnist1d", "--max-steps", "2", "--no-progress"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*FIT, "--lr", "0"], r"autobatch fit: error: argument --lr: must be > 0 \(got '0'\)"),
        ([*FIT, "--lr", "-1"], r"argument --lr: must be > 0 \(got '-1'\)"),
        ([*FIT, "--lr", "inf"], r"argument --lr: must be a finite number \(got 'inf'\)"),
        ([*FIT, "--batch-size", "0"], r"argument --batch-size: must be an integer >= 1 \(got '0'\)"),
        ([*FIT, "--batch-size", "8.5"], r"argument --batch-size: must be an integer \(got '8.5'\)"),
        ([*FIT, "--epochs", "-1"], r"argument --epochs: must be > 0 \(got '-1'\)"),
        ([*FIT, "--max-steps", "0"], r"argument --max-steps: must be an integer >= 1 \(got '0'\)"),
        ([*FIT, "--max-lr-factor", "abc"],
         r"argument --max-lr-factor: must be a number > 0, or 'none' for no cap \(got 'abc'\)"),
        ([*FIT, "--max-lr-factor", "0"], r"argument --max-lr-factor: must be a number > 0, or 'none' .*\(got '0'\)"),
        ([*FIT, "--lr-scaling", "bogus"], (r"argument --lr-scaling: invalid choice: 'bogus' \(choose from "
                                            r"'?adascale'?, '?linear'?, '?none'?, '?sqrt'?\)")),
        ([*FIT, "--budget", "4 GiBs"], r"argument --budget: cannot read memory size '4 GiBs'"),
        ([*FIT_CNN, "--budget", "1KiB"], (r"autobatch fit: error: .*budget too small: a training step at batch "
                                          r"size 1 needs [\d,]+ bytes .* raise budget_bytes to at least")),
        ([*FIT, "--resume"], r"autobatch fit: error: --resume needs --checkpoint-dir"),
        (["probe", "--problem", "mnist1d", "--budget", "1KiB"],
         r"autobatch probe: error: budget too small: a training step at batch size 1 needs"),
        (["probe", "--problem", "synthetic", "--margin", "1"], r"argument --margin: must be in \[0, 1\)"),
        (["probe", "--problem", "synthetic", "--max-micro-batch-size", "-4"], r"must be an integer >= 1 \(got '-4'\)"),
        (["tune", "--problem", "synthetic", "--trials", "0"], r"argument --trials: must be an integer >= 1"),
        (["tune", "--problem", "synthetic", "--lr-min", "1", "--lr-max", "0.1"],
         r"autobatch tune: error: --lr-min must be below --lr-max \(got --lr-min 1, --lr-max 0.1\)"),
        (["tune", "--problem", "synthetic", "--storage", "nosuchdb://x/y"],
         r"autobatch tune: error: cannot open storage 'nosuchdb://x/y' \(.*\); give a database URL"),
        (["tune", "--problem", "synthetic", "--storage", "studies.db"],
         r"autobatch tune: error: storage 'studies.db' is not a URL"),
        (["fit", "--problem", "nosuch"], r"argument --problem: invalid choice: 'nosuch'"),
        ([*FIT, "--gns-every", "0"], r"argument --gns-every: must be an integer >= 1, or 'auto' \(got '0'\)"),
        # a mistyped flag or choice: the closest one named, and the subcommand's own help
        ([*FIT, "--polcy", "budget"],
         r"^autobatch fit: error: unrecognized arguments: --polcy budget; did you mean --policy\? "
         r"\(see autobatch fit --help\)$"),
        ([*FIT, "--batch_size", "8", "--lr_scaling", "none"],
         r"unrecognized arguments: --batch_size 8 --lr_scaling none; did you mean --batch-size and --lr-scaling\?"),
        ([*FIT, "--policy", "budgte"],
         r"argument --policy: invalid choice: 'budgte' \(choose from .*'measure'.*\); did you mean 'budget'\? "
         r"\(see autobatch fit --help\)"),
        ([*FIT, "--loggers", "tensorbord"], r"argument --loggers: invalid choice: .*did you mean 'tensorboard'\?"),
        (["tune", "--problem", "synthetic", "--trails", "3"],
         r"^autobatch tune: error: unrecognized arguments: --trails 3; did you mean --trials\? \(see autobatch tune --help"),
        (["fti", "--problem", "synthetic"],
         r"^autobatch: error: argument COMMAND: invalid choice: 'fti' .*; did you mean 'fit'\? \(see autobatch --help\)"),
        pytest.param([*FIT, "--device", "cuda"], r"argument --device: device 'cuda' is not available on this machine",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        (["fit", "--model", "nosuch_module_f25:build", "--max-steps", "2"],
         r"autobatch fit: error: --model needs --lr: the base LR at the base batch \(a number > 0"),
        (["fit", "--model", "nosuch_module_f25:build", "--lr", "0.1"],
         r"autobatch fit: error: --model needs --epochs or --max-steps"),
        (["fit", "--problem", "synthetic", "--model", "m:f"], r"argument --model: not allowed with argument --problem"),
    ],
)
def test_a_bad_setting_prints_one_line_and_exits_2(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing written where the tests run
    code, err = _run_main(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # it stopped before writing anything


def test_fit_under_a_small_budget_trains_at_the_probed_micro_batch(capsys, tmp_path, monkeypatch) -> None:
    # the probe lets 234 examples into 20,000 bytes; the step once counted the epoch's whole
    # index tensor (a view of it) and ran out of memory at one example
    monkeypatch.chdir(tmp_path)
    assert main([*FIT, "--budget", "20000", "--out", str(tmp_path / "out")]) == 0
    assert "oom_retries=0" in capsys.readouterr().out



@pytest.mark.parametrize("argv", [
    [*FIT, "--lr", "0"],
    pytest.param([*FIT_CNN, "--budget", "1KiB"], marks=pytest.mark.slow),  # builds the CNN's data set
])
def test_the_console_command_fails_with_one_line_and_status_2(argv, tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "autobatch", *argv, "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("autobatch fit: error: ") and out.stdout == ""


def test_given_values_are_used_not_replaced_by_the_example_defaults(tmp_path, capsys) -> None:
    import json

    code = main([*FIT, "--max-steps", "3", "--lr", "0.001", "--batch-size", "5", "--policy", "fixed",
                 "--out", str(tmp_path)])
    assert code == 0
    history = json.loads((tmp_path / "synthetic-fixed.json").read_text())["history"]
    assert [r["batch_size"] for r in history] == [5, 5, 5]
    assert history[0]["lr"] == pytest.approx(0.001)
    # --gns-every: after the estimator's first 20 steps (all measured), every 4th step is split
    code = main([*FIT, "--max-steps", "40", "--policy", "fixed", "--gns-every", "4", "--out", str(tmp_path)])
    assert code == 0
    history = json.loads((tmp_path / "synthetic-fixed.json").read_text())["history"]
    assert [r["step"] for r in history if r["accum_steps"] == 2] == [*range(1, 21), 21, 25, 29, 33, 37]


def test_loggers_and_threads_from_the_command_line(tmp_path, capsys, monkeypatch) -> None:
    import json

    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # the suite keeps its one thread
    code = main([*FIT, "--max-steps", "12", "--loggers", "jsonl", "csv", "--threads", "3", "--out", str(tmp_path)])
    assert code == 0 and threads == [3]
    logs = tmp_path / "synthetic-budget-logs"
    assert f"logs: {logs} (jsonl, csv)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/batch_size" in r] == list(range(1, 13))
    assert (logs / "metrics.csv").read_text().startswith("step,train/batch_size,")


def test_checkpoint_dir_and_resume_continue_a_run_exactly(tmp_path, capsys) -> None:
    import json

    def history(name: str) -> list[dict]:
        return json.loads((tmp_path / name / "synthetic-budget.json").read_text())["history"]

    base = ["fit", "--problem", "synthetic", "--no-progress", "--max-lr-factor", "none"]
    assert main([*base, "--max-steps", "30", "--out", str(tmp_path / "full")]) == 0
    ckpt = str(tmp_path / "ckpt")
    assert main([*base, "--max-steps", "12", "--checkpoint-dir", ckpt, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "ckpt" / "last.pt").exists()
    assert main([*base, "--max-steps", "30", "--checkpoint-dir", ckpt, "--resume",
                 "--out", str(tmp_path / "b")]) == 0
    full, resumed = history("full"), history("b")
    assert len(resumed) == 30 and resumed[12]["step"] == 13
    # the same steps, bit for bit: batch sizes, LRs and training losses
    assert [(r["batch_size"], r["lr"], r["train_loss"]) for r in resumed] == \
        [(r["batch_size"], r["lr"], r["train_loss"]) for r in full]


def test_byte_strings_are_read_alike_by_the_cli_fit_config_and_probe_memory() -> None:
    import torch

    from autobatch.cli._args import byte_size
    from autobatch.config import FitConfig
    from autobatch.memory.probe import probe_memory

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    batch = (torch.randn(8, 32), torch.randint(0, 4, (8,)))
    loss = torch.nn.functional.cross_entropy
    as_int = probe_memory(model, batch, loss, budget_bytes=150_000, mode="estimate", max_micro_batch_size=4096)
    as_text = probe_memory(model, batch, loss, budget_bytes="150KB", mode="estimate", max_micro_batch_size=4096)
    assert as_text.budget_bytes == 150_000 and as_text.max_micro_batch_size == as_int.max_micro_batch_size
    assert 1 < as_int.max_micro_batch_size < 4096  # the budget binds
    assert byte_size("4GiB") == FitConfig.from_any(memory_budget="4GiB").memory.memory_budget == 4 * 2**30
    assert probe_memory(model, batch, loss, budget_bytes="4GiB", mode="estimate").budget_bytes == 4 * 2**30
    with pytest.raises(ValueError, match=r"budget_bytes: cannot read memory size '4 GiBs'"):
        probe_memory(model, batch, loss, budget_bytes="4 GiBs")


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
@pytest.mark.parametrize("command", ["fit", "tune", "probe"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(command, where, tmp_path, monkeypatch,
                                                                            capsys) -> None:
    if where == "in /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "a_file").write_text("")
    out = str(tmp_path / "a_file" / "runs") if where == "under a file" else "/proc/autobatch-runs"
    reason = "Not a directory" if where == "under a file" else r"No such file or directory|Permission denied"

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output folder was checked")

    monkeypatch.setattr(autobatch, "fit", no_work)
    monkeypatch.setattr("autobatch.tune.study.tune_lr", no_work)
    monkeypatch.setattr("autobatch.memory.probe.probe_memory", no_work)
    argv = {"fit": [*FIT, "--out", out],
            "tune": ["tune", "--problem", "synthetic", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", out],
            "probe": ["probe", "--problem", "synthetic", "--plot", f"{out}/p.png"]}[command]
    code, err = _run_main(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    flag = "--out" if command != "probe" else r"--plot '.*/p.png': its folder"
    assert re.search(rf"autobatch {command}: error: {flag}='{re.escape(out)}' is not writable \(({reason})\); pass a "
                     "directory this process can create and write files in", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


_FACTORIES = {
    "cli_raises_f25": "def build():\n    raise RuntimeError('boom')\n",
    "cli_syntax_f25": "def build(:\n    pass\n",
    "cli_wrong_f25": "def build():\n    return 3\n",
    "cli_import_f25": "import nosuch_dependency_f25\n",
}


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """The modules of ``_FACTORIES`` in a folder on sys.path, forgotten afterwards."""
    for name, text in _FACTORIES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in _FACTORIES:
        sys.modules.pop(name, None)


_PROBE_RETURNS = r"--model names a function that takes no argument and returns \(model, example_batch, loss_fn\)"


@pytest.mark.usefixtures("factories")
@pytest.mark.parametrize(("argv", "message"), [
    (["probe", "--model", "os:system"], rf"--model os:system: system takes arguments \(command\); {_PROBE_RETURNS}"),
    (["probe", "--model", "cli_raises_f25:build"],
     rf"--model cli_raises_f25:build raised RuntimeError: boom \(at .*cli_raises_f25.py:2\); {_PROBE_RETURNS}"),
    (["probe", "--model", "cli_syntax_f25:build"],
     r"--model cli_syntax_f25:build: cli_syntax_f25 does not compile: invalid syntax \(.*cli_syntax_f25.py, line 1\); "
     r"fix the syntax error"),
    (["probe", "--model", "cli_import_f25:build"],
     r"--model cli_import_f25:build: cannot import 'cli_import_f25' \(No module named 'nosuch_dependency_f25'\); run "
     r"from the folder holding cli_import_f25.py or put that folder on PYTHONPATH"),
    (["probe", "--model", "cli_wrong_f25:build"],
     r"--model cli_wrong_f25:build must return \(model, example_batch, loss_fn\) \(got a int\)"),
    (["probe", "--model", "cli_wrong_f25:nothing"], r"cli_wrong_f25 has no callable 'nothing'"),
    (["fit", "--model", "cli_raises_f25:build", "--lr", "0.1", "--max-steps", "2"],
     r"--model cli_raises_f25:build raised RuntimeError: boom \(at .*cli_raises_f25.py:2\); --model names a function "
     r"that takes no argument and returns \(model, train_data, loss_fn\) or \(model, train_data, loss_fn, val_data\)"),
    (["fit", "--model", "os:system", "--lr", "0.1", "--max-steps", "2"], r"--model os:system: system takes arguments"),
    (["fit", "--model", "cli_syntax_f25:build", "--lr", "0.1", "--max-steps", "2"],
     r"--model cli_syntax_f25:build: cli_syntax_f25 does not compile: invalid syntax"),
])
def test_a_model_factory_that_cannot_be_used_prints_one_line_and_exits_2(argv, message, capsys) -> None:
    code, err = _run_main(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(rf"^autobatch {argv[0]}: error: {message}", err), err


def test_tune_on_a_read_only_database_prints_one_line_and_exits_2(tmp_path, capfd) -> None:
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'ro.db'}", study_name="other")  # the tables exist
    read_only = f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true"  # refused even to root
    code = main(["tune", "--problem", "synthetic", "--trials", "1", "--storage", read_only, "--study", "s",
                 "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err  # the file descriptor: Optuna's log handler writes there too
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"autobatch tune: error: cannot write study 's' to storage {read_only!r} (OperationalError: attempt "
                   "to write a readonly database); make the database file and its folder writable, or pass another "
                   "storage such as 'sqlite:///autobatch_studies.db' in a folder you can write\n")
    assert not (tmp_path / "out").exists()


_FIT_FACTORY = """
import torch
from torch import nn

def build():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    return nn.Linear(8, 1), (x, y), nn.functional.mse_loss

def build_with_val():
    model, data, loss_fn = build()
    return model, data, loss_fn, (data[0][:64], data[1][:64])
"""


def test_fit_trains_a_user_factory_and_the_same_factory_serves_the_probe(tmp_path, monkeypatch, capsys) -> None:
    import json

    (tmp_path / "cli_user_f25.py").write_text(_FIT_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        out = tmp_path / "runs"
        code = main(["fit", "--model", "cli_user_f25:build_with_val", "--lr", "0.05", "--max-steps", "6",
                     "--batch-size", "16", "--policy", "fixed", "--optimizer", "sgd", "--no-progress",
                     "--out", str(out)])
        stdout = capsys.readouterr().out
        assert code == 0 and "autobatch fit --model cli_user_f25:build_with_val --policy fixed" in stdout
        result = json.loads((out / "build_with_val-fixed.json").read_text())
        assert result["steps"] == 6 and [r["batch_size"] for r in result["history"]] == [16] * 6
        assert result["history"][0]["lr"] == pytest.approx(0.05) and "val_loss" in result["evals"][-1]
        assert (out / "build_with_val-fixed.png").exists()
        assert main(["fit", "--model", "cli_user_f25:build", "--lr", "0.05", "--max-steps", "2", "--no-progress",
                     "--out", str(out)]) == 0
        assert main(["probe", "--model", "cli_user_f25:build", "--budget", "1MiB"]) == 0
        assert "max micro-batch" in capsys.readouterr().out
    finally:
        sys.modules.pop("cli_user_f25", None)


# -- autobatch probe ----------------------------------------------------------------------------
def test_cli_probes_a_user_factory(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 10))
            batch = (torch.randn(4, 40), torch.randint(0, 10, (4,)))
            return model, batch, nn.functional.cross_entropy
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    plot = tmp_path / "p.png"
    code = main(["probe", "--model", "my_models:build", "--budget", "2MiB", "--margin", "0",
                 "--optimizer", "sgd", "--plot", str(plot)])
    out = capsys.readouterr().out
    model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 10))  # as build() makes it
    batch = (torch.randn(4, 40), torch.randint(0, 10, (4,)))
    expected = probe_memory(model, batch, nn.functional.cross_entropy,
                            functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),  # --optimizer sgd
                            budget_bytes=2 * 2**20, margin=0)
    assert code == 0 and f"max micro-batch   {expected.max_micro_batch_size:12d}" in out
    assert plot.exists()
    sys.modules.pop("my_models", None)


def test_cli_reports_bad_arguments(capsys) -> None:
    assert main(["probe", "--model", "no_colon_here", "--budget", "1GiB"]) == 2
    assert "--model must be module:factory (got 'no_colon_here')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", "--budget", "1GiB"])  # neither --problem nor --model


def test_cli_probes_a_built_in_example(capsys) -> None:
    from autobatch.registry import get_problem

    ex = get_problem("synthetic")
    expected = probe_memory(ex.model_fn(), ex.train_data, ex.loss_fn,
                            lambda params: ex.optimizer(params, ex.default_lr),
                            budget_bytes=2**20, margin=0.1, max_micro_batch_size=4096)
    assert main(["probe", "--problem", "synthetic", "--budget", "1MiB",
                 "--max-micro-batch-size", "4096"]) == 0
    out = capsys.readouterr().out
    assert f"max micro-batch   {expected.max_micro_batch_size:12d}" in out
    assert "budget                     1.0 MiB  (margin 10%" in out


# -- autobatch tune -----------------------------------------------------------------------------
def test_cli_prints_the_table_and_best_lr_and_writes_the_plot(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    code = main(["tune", "--problem", "synthetic", "--trials", "2", "--epochs", "0.1", "--storage", url,
                 "--study", "cli", "--lr-min", "0.01", "--lr-max", "0.3", "--evals", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "study 'cli'" in out and "best base LR: " in out and "at B0=16" in out
    lrs = [float(line.split()[2]) for line in out.splitlines() if line[:1].isdigit()]
    assert len(lrs) == 2 and all(0.01 <= lr <= 0.3 for lr in lrs)
    assert (tmp_path / "tune-synthetic.png").exists()
    assert len(optuna.load_study(study_name="cli", storage=url).trials) == 2
