"""The GPU suite's commands as it would start them on a GPU, checked on the CPU without running them: every script's
flags parse, and every fit (and the sweep's tests) that the suite or its scripts would start parses as a CLI
configuration (``--print_config``). The smoke mode runs the same steps with CPU flags; a typo in a flag that only
the GPU mode passes fails here, not in a GPU lease."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cutmix_pl.cli import main as cli
from test_scripts import SCRIPTS, load

REPO = SCRIPTS.parent


def gpu_commands(data: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """(step, command) of every process the suite starts first in each step, with the GPU mode's flags; a script's
    ``main(argv)`` that the suite runs in a process of its own (``python_call``) as ``python scripts/<name>.py argv``."""
    gpu_suite = load("gpu_suite")
    calls: list[tuple[str, list[str]]] = []

    def record(self, step, cmd, **env):
        calls.append((step.name, cmd))
        return 1  # as if it failed: each step stops after its first process

    def record_script(self, step, script, result, argv):
        record(self, step, [sys.executable, str(SCRIPTS / f"{script}.py"), *argv])
        return 1, None

    monkeypatch.setattr(gpu_suite.Suite, "call", record)
    monkeypatch.setattr(gpu_suite.Suite, "python_call", record_script)
    # --engine graphs: the sweep gets the engine's flags too (they extend each run's own)
    suite = gpu_suite.Suite(gpu_suite.parse(["--data-dir", str(data), "--out", str(out), "--engine", "graphs"]))
    for name in gpu_suite.STEPS:
        suite.run(name, getattr(suite, f"step_{name}"))
    return calls


def assert_cli_parses(args: list[str]) -> None:
    """``python -m cutmix_pl <args>`` (fit or test) as a configuration: parsed and checked, nothing run."""
    with pytest.raises(SystemExit) as exit_:
        cli([*args, "--print_config"])
    assert exit_.value.code in (0, None), f"does not parse: {' '.join(args)}"


def fits_of_script(script: str, argv: list[str], tmp: Path) -> list[list[str]]:
    """The script's flags parsed as its own ``main`` parses them; the ``cutmix_pl`` arguments of the fits (and
    tests) it would start."""
    module = load(script)
    if script == "bench_fit":
        args, extra = module.parse(argv)
        commands = [module.fit_command(v, args.long, args, extra, str(tmp)) for v in args.variants]
        assert all(checkout == REPO for checkout, _ in commands)  # configs/smoke.yaml is relative to it
        return [cmd[3:] for _, cmd in commands]
    if script == "sweep":
        args, extra = module.parse(argv)
        runs = module.select(args)
        if args.throughput:
            runs = [r for copies in module.throughput_runs(args, runs)[1].values() for r in copies]
        sweep = module.Sweep(args, extra)
        tests = [] if args.throughput or args.no_test else [
            sweep.command("test", r, ["--ckpt_path", str(tmp / "last.ckpt")])[3:] for r in runs]
        return [*(sweep.command("fit", r, [])[3:] for r in runs), *tests]
    module.parse(argv)  # a benchmark of its own: no fit
    return []


def test_every_command_of_the_gpu_mode_parses(tiny_cifar, tmp_path, monkeypatch):
    calls = gpu_commands(tiny_cifar, tmp_path / "suite", monkeypatch)
    assert [s for s, _ in calls] == ["env", "engine200", "pytest", "bench_augment", "bench_train", "bench_fit", "ddp",
                                     "bench_randaugment", "throughput", "sweep"]
    monkeypatch.chdir(REPO)  # where the suite starts its processes
    fits: dict[str, list[list[str]]] = {}
    for step, cmd in calls:
        assert cmd[0] == sys.executable
        if cmd[1:3] == ["-m", "cutmix_pl"]:
            fits[step] = [cmd[3:]]
        elif Path(cmd[1]).parent == SCRIPTS:
            fits[step] = fits_of_script(Path(cmd[1]).stem, cmd[2:], tmp_path)
    sweep = load("sweep")
    grid = len(sweep.PRESETS["gpu-results"])
    # the sweep: a fit and a test of each run; the engine's probe: a fit alone (--no-test)
    assert {s: len(f) for s, f in fits.items() if f} == {"engine200": 1, "bench_fit": 3, "ddp": 1, "throughput": 5,
                                                         "sweep": 2 * grid}
    assert [a[0] for a in fits["sweep"]] == ["fit"] * grid + ["test"] * grid
    assert all("--model.compile" in args and "reduce-overhead" in args for args in fits["sweep"])  # the engine's
    assert "--trainer.accelerator" in fits["ddp"][0] and "gpu" in fits["ddp"][0]
    for args in (a for f in fits.values() for a in f):
        assert_cli_parses(args)
