"""The command line: train reports loss = -ELBO, evaluate prints exact JSON keys, every --help is
complete, and every user mistake is one line ``elbo-lab: error: ...`` with exit status 2."""

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

from inference.cli import build_parser, main


def _run(argv) -> int:
    """``main``'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run of the default VAE (hidden 16) on the digits, and what train printed."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "train",
                "--epochs",
                "2",
                "--hidden-dims",
                "16",
                "--run-dir",
                str(run_dir),
                "--no-progress",
            ]
        )
    assert code == 0
    return run_dir, out.getvalue()


def test_train_prints_the_sign_report(trained):
    run_dir, out = trained
    assert "loss = -ELBO" in out and "(ok)" in out and "MISMATCH" not in out
    assert "with TraceMeanField_ELBO (JIT-compiled);" in out  # the default, for a static VAE
    # "loss = -ELBO = KL - E[log p(x|z)] = a - (b) = c nats/image" with c = a - b
    m = re.search(r"= (-?[\d.]+) - \((-?[\d.]+)\) = (-?[\d.]+) nats/image", out)
    kl, reconstruction, loss = map(float, m.groups())
    assert kl > 0 and loss == pytest.approx(kl - reconstruction, abs=0.011)
    for name in ("metrics.csv", "metrics.jsonl", "config.json", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name


def test_evaluate_json_has_exactly_the_documented_keys(trained, capsys):
    run_dir, _ = trained
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {
        *("loss", "elbo", "elbo_stderr", "reconstruction", "kl", "n"),
        *("estimator", "pyro_loss", "bounds"),
    }
    assert result["estimator"] == "TraceMeanField_ELBO" and result["bounds"]["ok"]
    bounds = result["bounds"]
    assert bounds["elbo"] == result["elbo"] and bounds["elbo"] < bounds["lk"]
    assert result["n"] == 359
    assert result["loss"] == -result["elbo"]
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"], rel=1e-12)
    # the checkpoint's test row (one draw per image), recomputed from disk with 10 draws
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["split"] == "test" and result["elbo_stderr"] > 0
    assert abs(result["elbo"] - last["elbo"]) < 5 * result["elbo_stderr"] * 11**0.5


def test_evaluate_text_report(trained, capsys):
    run_dir, _ = trained
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "loss = -ELBO" in out and "(ok)" in out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(_subparsers(build_parser()))


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_help_lists_every_option(command, capsys):
    assert _run([command, "--help"]) == 0
    out = capsys.readouterr().out
    for action in _subparsers(build_parser())[command]._actions:
        for option in action.option_strings:
            assert option in out, option
        if not action.option_strings:  # positional
            assert action.dest in out or (action.metavar or "") in out
        if action.help and action.help is not argparse.SUPPRESS:
            assert action.help.split()[0] in out


def test_top_level_help_lists_the_commands(capsys):
    assert _run(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


BAD = {
    "epochs-zero": (["train", "--epochs", "0"], "--epochs"),
    "negative-lr": (["train", "--lr", "-1"], "--lr"),
    "unknown-estimator": (["train", "--estimator", "nope"], "--estimator"),
    "unknown-jit": (["train", "--jit", "maybe"], "--jit"),
    "threads-zero": (["train", "--threads", "0"], "--threads"),
    "unknown-model": (["train", "--model", "nope"], "--model"),
    "hidden-dims": (["train", "--hidden-dims", "16,x"], "--hidden-dims"),
    "missing-data-file": (["train", "--data", "{tmp}/missing.npy"], "missing.npy"),
    "existing-run-dir": (["train", "--run-dir", "{run}"], "--force"),
    "evaluate-missing-dir": (["evaluate", "{tmp}/no-run"], "no-run"),
    # L_1 is the ELBO itself: no gap, no standard error across draws, no PSIS tail
    "explain-one-sample": (["explain", "{run}", "--num-samples", "1"], "--num-samples"),
    "compare-one-sample": (["compare", "--num-samples", "1"], "--num-samples"),
    "watch-one-sample": (["watch", "--num-samples", "1", "{tmp}/x.py"], "--num-samples"),
    "no-command": ([], "required"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_options_are_one_line_errors(case, trained, tmp_path, capsys):
    argv, named = BAD[case]
    run_dir, _ = trained
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    if argv and argv[0] == "train" and "--run-dir" not in argv:
        argv += ["--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert _run(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("elbo-lab: error:") and named in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()  # nothing written on a refused command


def test_installed_console_script():
    script = Path(sys.executable).parent / "elbo-lab"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: elbo-lab")
    assert "train" in result.stdout and "evaluate" in result.stdout


def test_threads_sets_torch_threads(tmp_path):

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["train", "--epochs", "1", "--hidden-dims", "8", "--threads", "1"]
        assert main([*argv, "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_broken_estimator_is_reported_as_a_bound_violation(trained, capsys, monkeypatch):
    """Make a violation on purpose: an evaluation that adds 5 nats to every ELBO (as a KL that
    drops a log-Jacobian would). The report marks it, the JSON says so, the exit status is 1."""
    import inference.elbo

    honest = inference.elbo.evaluate

    def broken(*args, **kwargs):
        m = honest(*args, **kwargs)
        return m._replace(elbo=m.elbo + 5.0, loss=m.loss - 5.0, kl=m.kl - 5.0)

    monkeypatch.setattr(inference.elbo, "evaluate", broken)
    run_dir, _ = trained
    assert main(["evaluate", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "!! BOUND VIOLATED: ELBO" in out and "is not a lower bound" in out
    assert main(["evaluate", str(run_dir), "--json"]) == 1
    bounds = json.loads(capsys.readouterr().out)["bounds"]
    assert bounds["ok"] is False and bounds["violations"]
    monkeypatch.setattr(inference.elbo, "evaluate", honest)
    assert main(["evaluate", str(run_dir)]) == 0
    assert "BOUND VIOLATED" not in capsys.readouterr().out


def test_help_and_option_errors_need_no_torch():
    """The parser is built from inference/choices.py alone: ``--help`` and a refused option
    import neither torch, Pyro, matplotlib nor scikit-learn."""
    code = (
        "import sys\n"
        "from inference.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--epochs', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'torch', 'pyro', 'matplotlib', 'sklearn', 'arviz', 'tqdm'}\n"
        "loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules})\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, capture_output=True)


def test_parser_names_are_the_librarys():
    from inference import choices, run, train

    assert choices.MODELS == run.MODELS
    assert choices.DTYPES == tuple(run.DTYPES)
    assert choices.ESTIMATORS == tuple(train.ESTIMATOR_CHOICES)
    assert choices.JIT_MODES == train.JIT_MODES
    defaults = train.TrainConfig()
    assert (choices.EPOCHS, choices.ESTIMATOR, choices.JIT, choices.CHECKPOINT_EVERY) == (
        defaults.epochs,
        defaults.estimator,
        defaults.jit,
        defaults.checkpoint_every,
    )


@pytest.mark.parametrize("command", ["evaluate", "explain"])
def test_threads_option_of_evaluate_and_explain(command, trained, capsys):

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_dir, _ = trained
        extra = ["--num-samples", "10"] if command == "explain" else []
        assert main([command, str(run_dir), "--threads", "1", *extra]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main([command, str(run_dir), *extra]) == 0  # a small model: 1 by default
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_threads_of_the_default_vae(tmp_path):
    """The default VAE's step (24 MFLOP) is far below a thread's worth of work: 1 thread."""

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["train", "--epochs", "1", "--hidden-dims", "8"]
        assert main([*argv, "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_parser_optimizers_are_the_librarys():
    from inference import choices, train

    assert choices.OPTIMIZERS == tuple(train.OPTIMIZERS)


COMPARE_MODEL_FILE = """
import pyro, pyro.distributions as dist, torch

def model(data):
    X, y = data[:, :-1], data[:, -1]
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((w * X).sum(-1), 1.0), obs=y)
"""


def regression_data(n=10, d=3, seed=1):
    """[X | y] ``(n, d + 1)`` for COMPARE_MODEL_FILE, with correlated columns."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 1, generator=g)
    X = shared + 0.5 * torch.randn(n, d, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.3]) + torch.randn(n, generator=g)
    return torch.cat([X, y[:, None]], dim=1)


def test_cli_compare_vae(tmp_path, capsys):
    out = tmp_path / "vae"
    argv = ["compare", "--guides", "diag,flow", "--epochs", "1", "--latent-dim", "2"]
    argv += ["--hidden-dims", "16", "--num-samples", "16", "--eval-particles", "2"]
    argv += ["--num-draws", "20", "--run-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| diag |" in printed and "| flow |" in printed
    for name in ("comparison.csv", "comparison.json", "comparison.md", "comparison.png"):
        assert (out / name).exists()
    idata = az.from_netcdf(out / "posterior_flow.nc")
    assert dict(idata.posterior.sizes) == {"chain": 4, "draw": 5, "datum": 359, "z_dim": 2}
    assert main(argv) == 2  # exists without --force
    assert "exists" in capsys.readouterr().err


def test_cli_compare_user_model(tmp_path, capsys):
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(COMPARE_MODEL_FILE))
    data = regression_data(n=20).numpy().astype(np.float32)
    np.savez(tmp_path / "data.npz", train=data[:15], test=data[15:])
    argv = ["compare", "--model", f"{path}:model", "--guides", "AutoDelta,AutoNormal"]
    argv += ["--data", str(tmp_path / "data.npz"), "--epochs", "5", "--num-samples", "16"]
    argv += ["--eval-particles", "2", "--num-draws", "20", "--run-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| AutoDelta |" in printed and "omits the entropy" in printed
    assert az.summary(az.from_netcdf(tmp_path / "out" / "posterior_AutoNormal.nc")).shape[0] == 3
    assert main(argv[:4] + ["diag"] + argv[5:] + ["--force"]) == 2
    assert "amortized encoder" in capsys.readouterr().err


# --- one vocabulary: every command that writes takes --run-dir, every one that computes
# --threads; one name per count; renamed spellings warn for one release ---------------------------

WRITES = ["train", "compare", "watch"]  # evaluate and explain read RUN_DIR (explain adds a figure)


def _options(command: str) -> dict[str, argparse.Action]:
    return {o: a for a in _subparsers(build_parser())[command]._actions for o in a.option_strings}


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_every_command_takes_threads_and_every_writer_a_run_dir(command):
    options = _options(command)
    assert "--threads" in options
    assert ("--run-dir" in options) == (command in WRITES)
    if command in WRITES:
        assert options["--run-dir"].option_strings[0] == "--run-dir"


def test_a_count_has_one_name_in_every_command():
    """--num-particles counts the training objective's draws, --eval-particles an estimated
    ELBO's draws, --num-samples L_K's K, --num-draws saved posterior draws: a name means one
    thing, and its help says which."""
    meaning = {
        "--num-particles": "training objective",
        "--eval-particles": "ELBO and its standard error",
        "--num-samples": "importance samples K",
        "--num-draws": "posterior draws",
    }
    seen = set()
    for command in COMMANDS:
        for option, action in _options(command).items():
            if option in meaning and option == action.option_strings[0]:
                assert meaning[option] in action.help, (command, option, action.help)
                seen.add(option)
    assert seen == set(meaning)


RENAMED = {
    "compare-out": ("compare", "--out", "--run-dir", "x", Path("x")),
    "compare-elbo-particles": ("compare", "--elbo-particles", "--eval-particles", "7", 7),
    "watch-num-particles": ("watch", "--num-particles", "--eval-particles", "7", 7),
}


@pytest.mark.parametrize("case", list(RENAMED), ids=list(RENAMED))
def test_a_renamed_option_still_works_with_one_warning(case, capsys):
    command, old, new, text, value = RENAMED[case]
    tail = ["script.py"] if command == "watch" else []
    args = build_parser().parse_args([command, old, text, *tail])
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"elbo-lab: warning: {old} is deprecated and will be removed in the next release; use {new}"
    ]
    assert getattr(args, new[2:].replace("-", "_")) == value
    assert build_parser().parse_args([command, new, text, *tail]) == args
    assert capsys.readouterr().err == ""  # the new spelling: no warning
    assert (
        old in _options(command) and f"formerly {old} (deprecated)" in _options(command)[old].help
    )


@pytest.mark.parametrize("spelling", ["--run-dir", "--out"])
def test_compare_names_run_dir_in_its_errors(spelling, tmp_path, capsys):
    """Whatever spelling the user typed, the option is named by its canonical name."""
    (tmp_path / "file").write_text("")
    assert _run(["compare", spelling, str(tmp_path / "file" / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"elbo-lab: error: --run-dir: {tmp_path / 'file'} is a file, not a directory"
    assert len(err) == (1 if spelling == "--run-dir" else 2)


#: Library parameters that no option sets (a Python caller's only).
NO_FLAG = {"budget", "chunk_size", "eval_batch_size", "num_chains"}


def _library_parameters_in_errors() -> set[str]:
    """The string values of every ``option=`` keyword and ``option`` default in inference/."""
    import ast

    import inference

    names = set()
    for path in Path(inference.__file__).parent.glob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "option":
                value = node.value
            elif isinstance(node, ast.arguments):
                positional = [*node.posonlyargs, *node.args]
                named = [*positional, *node.kwonlyargs]
                defaults = [None] * (len(positional) - len(node.defaults)) + node.defaults
                pairs = zip(named, [*defaults, *node.kw_defaults], strict=True)
                value = next((d for a, d in pairs if a.arg == "option" and d is not None), None)
            else:
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                names.add(value.value)
    return names


def test_library_errors_name_parameters_and_the_cli_one_table_words_them():
    """The library words an error in its parameter (``num_draws: ...``); the command line prints
    the option that sets it, from FLAGS, whose every entry is a real option."""
    from inference.cli import FLAGS, as_options, error_line
    from inference.errors import OptionError, RunError

    every_option = {o for command in COMMANDS for o in _options(command)}
    assert set(FLAGS.values()) <= every_option
    used = _library_parameters_in_errors()
    assert {"guides", "estimator", "run_dir", "model", "data"} <= used
    assert used <= set(FLAGS) | NO_FLAG, used - set(FLAGS) - NO_FLAG
    error = OptionError("must be a positive number, got 0", option="learning_rate")
    assert str(error) == "learning_rate: must be a positive number, got 0"
    assert error_line(error) == "--lr: must be a positive number, got 0"
    hint = RunError("runs/x exists (use force=True to replace it, resume=True to continue it)",
                    option="run_dir")  # fmt: skip
    assert error_line(hint) == "--run-dir: runs/x exists (use --force to replace it, --resume to continue it)"  # fmt: skip
    assert error_line(OptionError("'a' lacks it; use estimator='trace'", option="estimator")) == (
        "--estimator: 'a' lacks it; use --estimator trace"
    )
    assert as_options("using it anyway (allow_changed=True)") == "using it anyway (--allow-changed)"
    assert error_line(OptionError("num_chains=4 is fixed", option="budget")) == (
        "budget: num_chains=4 is fixed"  # no option: the library's own words
    )


def test_a_config_error_is_one_line_naming_the_option(tmp_path, capsys):
    """CompareConfig raises ``num_draws: ...``; the command line says ``--num-draws: ...``."""
    assert _run(["compare", "--num-draws", "3", "--run-dir", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "elbo-lab: error: --num-draws: need at least one draw per chain (4), got 3"
    ]
    assert not (tmp_path / "c").exists()


def test_parser_defaults_are_the_librarys():
    """What the command line fills in when an option is not given is what the library takes by
    default, read from inference/choices.py, not typed again."""
    import inspect

    from inference import choices, run, train
    from inference.compare import CompareConfig
    from inference.explain import explain
    from inference.watch import WatchConfig, explain_watched

    parse = build_parser().parse_args
    config, spec = train.TrainConfig(), run.ModelSpec()
    for command in ("train", "compare"):
        args = parse([command])
        assert (args.epochs, args.lr, args.seed, args.optimizer, args.jit) == (
            config.epochs,
            config.learning_rate,
            config.seed,
            config.optimizer,
            config.jit,
        )
        assert args.batch_size is None  # built-in models: choices.BATCH_SIZE, as TrainConfig's
        assert config.batch_size == choices.BATCH_SIZE
        assert (args.model, args.data, args.latent_dim, args.hidden_dims) == (
            spec.model,
            spec.data,
            spec.latent_dim,
            spec.hidden_dims,
        )
        assert (args.device, args.dtype) == (spec.device, spec.dtype)
    args = parse(["train"])
    assert (args.estimator, args.num_particles, args.checkpoint_every) == (
        config.estimator,
        config.num_particles,
        config.checkpoint_every,
    )
    args, options = parse(["compare"]), CompareConfig()
    assert (args.num_samples, args.eval_particles, args.num_draws) == (
        options.num_samples,
        options.eval_particles,
        options.num_draws,
    )
    assert args.estimator == choices.COMPARE_ESTIMATOR
    args, watching = parse(["watch", "script.py"]), WatchConfig()
    assert (args.num_samples, args.eval_particles) == (
        watching.num_samples,
        watching.eval_particles,
    )
    args = parse(["explain", "run"])
    assert args.num_samples == inspect.signature(explain).parameters["num_samples"].default
    assert args.num_samples == inspect.signature(explain_watched).parameters["num_samples"].default
    assert config.eval_batch_size == choices.EVAL_BATCH_SIZE
    for function in (train.evaluate, train.pyro_loss):
        assert (
            inspect.signature(function).parameters["batch_size"].default == config.eval_batch_size
        )


def test_watch_sets_threads(tmp_path, capsys, monkeypatch):
    """``watch --threads 1`` sets torch's threads before the script runs."""
    script = tmp_path / "threads.py"
    script.write_text("import torch\nprint('threads', torch.get_num_threads())\n")
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["watch", "--threads", "1", "--no-progress", str(script)]) == 0
        assert "threads 1" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
