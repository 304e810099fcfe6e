"""A run folder is untrusted input, a failed command leaves its run as it found it, every failure is one line
(issue 29): writes stay inside the run, a failed or refused command changes no run's state, damaged files are
named, not tracebacks, and what TensorBoard and the terminal show of a resumed or evaluated run is right."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cutmix_pl.cli import CONFIG_DIR, main

from cli_runs import fails, files_under, finish, small, spawn


def quick(data: Path, *extra: str) -> list[str]:
    return ["fit", *small(data), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", *extra]


def evals(data: Path, run: Path, *extra: str) -> list[str]:
    return [*small(data), "--ckpt_path", str(run), *extra]


@pytest.fixture
def run(tiny_cifar: Path, in_tmp: Path) -> Path:
    """A finished one-epoch run (absolute path) in the test's working folder."""
    return Path(main(quick(tiny_cifar)).trainer.log_dir).absolute()


# -- F1, F2: every write stays inside the run ----------------------------------------------------------------------
def test_an_evaluation_folder_that_links_out_of_the_run_is_refused(run, tiny_cifar, in_tmp, capsys):
    outside = in_tmp / "outside"
    outside.mkdir()
    (run / "predict").symlink_to(outside)
    line = fails(capsys, "predict", *evals(tiny_cifar, run))
    assert f"{run / 'predict'} is a symbolic link" in line and "fix: remove the link" in line
    assert not any(outside.iterdir()), "nothing written through the link"


def test_a_planted_link_in_the_evaluation_folder_is_never_written_through(run, tiny_cifar, in_tmp, capsys):
    victim = in_tmp / "victim.txt"
    victim.write_text("precious")
    (run / "predict").mkdir()
    (run / "predict" / "predictions.csv.tmp").symlink_to(victim)
    line = fails(capsys, "predict", *evals(tiny_cifar, run))
    assert "predictions.csv.tmp is a symbolic link" in line
    assert victim.read_text() == "precious"


def test_atomic_write_replaces_a_link_and_never_opens_a_guessed_name(tmp_path):
    from cutmix_pl.files import atomic_write

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "run" / "predictions.csv"
    target.parent.mkdir()
    target.symlink_to(victim)
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the names a fixed or pid-based scheme would use
        (target.parent / f".predictions.csv.{pid}.tmp").symlink_to(victim)
    (target.parent / "predictions.csv.tmp").symlink_to(victim)
    atomic_write(target, b"new")
    assert victim.read_text() == "precious" and not target.is_symlink() and target.read_bytes() == b"new"


def test_a_killed_predicts_temporary_file_is_cleared_by_the_next(run, tiny_cifar, in_tmp):
    folder = run / "predict"
    folder.mkdir()
    (folder / ".predictions.csv.k1ll3d.tmp").write_bytes(b"")  # what a kill -9 between open and write leaves
    main(["predict", *evals(tiny_cifar, run)])
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []
    rows = (folder / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("index,label,pred,") and [r.split(",")[0] for r in rows[1:]] == [
        str(i) for i in range(len(rows) - 1)] and len(rows) > 1


# -- F3: without a logger, one run per folder ---------------------------------------------------------------------
def test_a_second_fit_without_a_logger_does_not_overwrite_the_first(tiny_cifar, in_tmp, capsys):
    main(quick(tiny_cifar, "--trainer.logger", "false"))
    before = files_under(in_tmp / "checkpoints")
    assert "last.ckpt" in before
    line = fails(capsys, *quick(tiny_cifar, "--trainer.logger", "false"))
    assert f"{in_tmp} already holds an earlier run" in line and "--trainer.default_root_dir" in line
    assert files_under(in_tmp / "checkpoints") == before
    assert sorted(p.name for p in in_tmp.glob("config*.yaml")) == ["config.yaml"]


# -- F4, F8, low: checkpoints that hold other objects, another network, or no mapping --------------------------------
def test_weights_only_false_is_a_fix_that_works(run, tiny_cifar, in_tmp, capsys):
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["note"] = pathlib.PurePosixPath("made/elsewhere")  # an object a weights-only load refuses
    torch.save(checkpoint, in_tmp / "other.ckpt")
    line = fails(capsys, "test", *evals(tiny_cifar, in_tmp / "other.ckpt"))
    assert "holds objects that a weights-only load refuses; fix: pass --weights_only false" in line
    cli = main(["test", *evals(tiny_cifar, in_tmp / "other.ckpt"), "--weights_only", "false"])
    assert cli.trainer.state.finished and "test/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("hparams", [{"net": {"class_path": "torch.nn.Identity"}}, ["not", "a", "mapping"],
                                     {"net": {"class_path": "this.Net"}}])
def test_a_checkpoint_naming_another_network_is_one_line_and_runs_no_code(hparams, run, tiny_cifar, in_tmp,
                                                                         capsys):
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"] = hparams
    elsewhere = in_tmp / "elsewhere"
    elsewhere.mkdir()
    torch.save(checkpoint, elsewhere / "model.ckpt")
    sys.modules.pop("this", None)
    args = evals(tiny_cifar, elsewhere / "model.ckpt")
    for key in ("--model.net.depth", "--model.net.width"):  # the recipe's network: the command names none
        del args[args.index(key):args.index(key) + 2]
    line = fails(capsys, "test", *args)
    assert "fix:" in line and ("class_path=" in line or "unknown form (list)" in line)
    assert "this" not in sys.modules, "the module the checkpoint names was imported (and run)"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model.ckpt"], "no test/ folder left beside it"


# -- F5: a full disk before the run saved a last.ckpt ---------------------------------------------------------------
def full_disk_for(monkeypatch: pytest.MonkeyPatch, name: str, room: int = 0) -> None:
    """Every write of a file whose name holds ``name``, after the first ``room`` of them, fails half-way with
    ENOSPC."""
    real, written = os.fdopen, [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        if "w" not in mode or name not in os.readlink(f"/proc/self/fd/{fd}"):
            return f
        written[0] += 1
        return f if written[0] <= room else Full(f)

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize("name", [".ckpt", "last.ckpt"])
def test_a_full_disk_before_last_ckpt_leaves_no_run_and_says_run_again(name, tiny_cifar, in_tmp, capsys,
                                                                       monkeypatch):
    full_disk_for(monkeypatch, name)  # every checkpoint, or last.ckpt only (the best one is written)
    with pytest.raises(SystemExit) as exit_:
        main(quick(tiny_cifar))
    assert exit_.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("cutmix-pl: error: could not write the checkpoint ") and "No space left on device" in line
    assert "then run the command again" in line and "--ckpt_path last" not in line
    assert not (in_tmp / "runs").exists(), "no run without a last.ckpt to resume from is left"


def test_room_for_one_checkpoint_keeps_the_resume_point(tiny_cifar, in_tmp, capsys, monkeypatch):
    """last.ckpt is written before the best copy: a disk with room for one file keeps the state to resume from."""
    with monkeypatch.context() as patch:
        full_disk_for(patch, ".ckpt", room=1)
        with pytest.raises(SystemExit) as exit_:
            main(quick(tiny_cifar, "--trainer.max_epochs", "2"))
    assert exit_.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "best-epoch000.ckpt" in line and "No space left on device" in line and "--ckpt_path last" in line
    folder = in_tmp / "runs" / "smoke" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", "last"))  # space freed: it resumes
    assert (cli.trainer.current_epoch, cli.trainer.global_step) == (2, 4)
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]  # epoch 0's was never kept


def test_last_ckpt_records_the_best_copy_written_after_it(run):
    """Written first, last.ckpt is written again once the best copy is saved, so that a resume restores that
    ModelCheckpoint's record as it is on disk."""
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    best = [v for k, v in state.items() if "'monitor': 'val/acc'" in k or "monitor='val/acc'" in k]
    assert len(best) == 1 and Path(best[0]["best_model_path"]) == run / "checkpoints" / "best-epoch000.ckpt"
    assert (run / "checkpoints" / "best-epoch000.ckpt").is_file()


def test_a_failed_fit_without_a_logger_leaves_its_folder_as_it_found_it(tiny_cifar, in_tmp, capsys, monkeypatch):
    """Without a logger the folder may hold anything (data, code): a fit that saved no last.ckpt removes only what
    it wrote there (config.yaml, checkpoints/, the lock) and the folder itself when it made it."""
    kept = in_tmp / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (kept / ".draft.txt.1.tmp").write_text("mine too")  # a temporary name, but not of a file a fit writes
    (kept / "data").symlink_to(tiny_cifar)  # the folder is not the run's alone: its links are not refused
    unlogged = ("--trainer.logger", "false", "--trainer.default_root_dir")
    with monkeypatch.context() as patch:
        full_disk_for(patch, ".ckpt")
        for folder in ("new/run", "kept"):
            with pytest.raises(SystemExit):
                main(quick(tiny_cifar, *unlogged, folder))
            assert "could not write the checkpoint" in capsys.readouterr().err
    assert not (in_tmp / "new").exists()
    assert sorted(p.name for p in kept.iterdir()) == [".draft.txt.1.tmp", "data", "notes.txt"]
    main(quick(tiny_cifar, *unlogged, "kept"))  # nothing of the failed fit refuses the next one
    assert (kept / "checkpoints" / "last.ckpt").is_file()
    # a resume that fails before its last.ckpt leaves the run as it was: no config.resume1.yaml to count as its config
    before = {k: v for k, v in files_under(kept).items() if k != ".lock"}
    with monkeypatch.context() as patch:
        full_disk_for(patch, ".ckpt")
        with pytest.raises(SystemExit):
            main(quick(tiny_cifar, *unlogged, "kept", "--trainer.max_epochs", "2", "--ckpt_path", "kept"))
    assert {k: v for k, v in files_under(kept).items() if k != ".lock"} == before
    # a refusal after the folder was taken (a setting its data cannot meet) leaves nothing either
    fails(capsys, *quick(tiny_cifar, *unlogged, "other", "--data.val_size", "640"))
    assert not (in_tmp / "other").exists()


# -- F6: a failed or refused extension leaves a finished run finished ------------------------------------------------
def test_a_failed_or_refused_extension_leaves_the_run_finished(run, tiny_cifar, in_tmp, capsys):
    before = files_under(run)
    fails(capsys, *quick(tiny_cifar, "--trainer.max_epochs", "2", "--data.data_dir", "nowhere", "--ckpt_path",
                         str(run)))
    fails(capsys, *quick(tiny_cifar, "--trainer.max_epochs", "2", "--model.warmup_epochs", "0", "--ckpt_path",
                         str(run)))
    assert files_under(run) == before
    line = fails(capsys, *quick(tiny_cifar, "--ckpt_path", "last"))
    assert "continues unfinished runs only" in line and "has finished" in line


@pytest.mark.slow(seconds=15)
def test_an_extension_killed_as_it_writes_its_config_never_blocks_the_run(run, tiny_cifar, in_tmp, capsys):
    longer = quick(tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", str(run))
    proc = spawn(in_tmp, longer, KILL_IN_SAVE="1", KILL_IN_WRITE_OF="config.resume")
    assert finish(proc) == -signal.SIGKILL
    assert "config.resume1.yaml" in (in_tmp / "killed_in_save").read_text()
    assert not (run / "config.resume1.yaml").exists(), "the half-written config is a temporary file, not the run's"
    line = fails(capsys, *quick(tiny_cifar, "--ckpt_path", "last"))  # the run is found, with its own config
    assert "has finished" in line
    (run / "config.resume1.yaml").write_text("")  # what an in-place write killed at its start left behind
    assert "has finished" in fails(capsys, *quick(tiny_cifar, "--ckpt_path", "last"))
    main(longer)  # the extension runs, and writes its config beside the empty one
    assert yaml.safe_load((run / "config.resume2.yaml").read_text())["trainer"]["max_epochs"] == 2
    assert not list(run.glob(".*.tmp")), "the killed write's temporary file is cleared"


# -- F7: a damaged file in a sibling run -------------------------------------------------------------------------
def test_a_damaged_config_in_a_sibling_run_is_named_not_a_traceback(tiny_cifar, in_tmp, capsys):
    first = Path(main(quick(tiny_cifar)).trainer.log_dir).absolute()
    (first / "config.resume1.yaml").write_text("trainer: [1,\n")
    line = fails(capsys, *quick(tiny_cifar, "--ckpt_path", "last"))
    assert "version_0: " in line and "config.resume1.yaml cannot be read" in line
    line = fails(capsys, *quick(tiny_cifar, "--ckpt_path", str(first)))
    assert "config.resume1.yaml cannot be read" in line and "fix: repair that file" in line


# -- F9: a signal during an evaluation removes what it wrote ----------------------------------------------------------
PAUSE_IN_TEST = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cutmix_pl.cli import main
    from cutmix_pl.module import ImageClassifier

    def test_step(self, batch, batch_idx):
        Path("paused").write_text("test")
        time.sleep(300)  # a signal ends it

    ImageClassifier.test_step = test_step
    main(sys.argv[1:])
""")


@pytest.mark.slow(seconds=12)
def test_sigterm_during_test_removes_the_test_folder(run, tiny_cifar, in_tmp):
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_TEST, "test", *evals(tiny_cifar, run)], cwd=in_tmp,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (in_tmp / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    assert (run / "test" / "config.yaml").is_file(), "the test had written its folder"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cutmix-pl: stopped by SIGTERM outside training")
    assert not (run / "test").exists()


# -- low: a second Ctrl-C, and the stop line on a line of its own ------------------------------------------------------
PAUSE_AT_STEP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cutmix_pl.cli import main
    from cutmix_pl.module import ImageClassifier

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == 2:
            Path("paused").write_text("2")
            time.sleep(300)  # the second Ctrl-C ends it

    ImageClassifier.on_train_batch_end = on_train_batch_end
    main(sys.argv[1:])
""")


@pytest.mark.slow(seconds=12)
def test_a_second_ctrl_c_stops_at_once_in_one_line_of_its_own(tiny_cifar, in_tmp):
    out = open(in_tmp / "out.txt", "w")
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AT_STEP, *quick(tiny_cifar, "--trainer.limit_train_batches",
                                                                          "null", "--trainer.enable_progress_bar",
                                                                          "true")],
                            cwd=in_tmp, stdout=out, stderr=subprocess.STDOUT)  # one stream, as on a terminal
    deadline = time.monotonic() + 300
    while not (in_tmp / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (in_tmp / "out.txt").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    out.close()
    text = (in_tmp / "out.txt").read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if "cutmix-pl: stopped" in ln]
    assert len(lines) == 1 and lines[0].startswith("cutmix-pl: stopped by SIGINT after global step 2"), text[-2000:]
    assert "nothing saved (stopped at once by a second signal)" in lines[0]
    # before any checkpoint: nothing to resume, so no half run is left and the advice is to run it again
    assert lines[0].endswith("the run was removed: run the command again") and "--ckpt_path" not in lines[0]
    assert not (in_tmp / "runs").exists()


# -- F10 and low: values with no finite meaning name their key and a fix ------------------------------------------------
@pytest.mark.parametrize("flag,value,expected", [
    ("--model.warmup_epochs", ".inf", "model.warmup_epochs=inf is out of range"),
    ("--model.label_smoothing", "1", "model.label_smoothing=1.0 is out of range"),
    ("--model.optimizer.init_args.lr", ".inf", "model.optimizer lr=inf is not a finite number"),
    ("--model.optimizer.init_args.momentum", ".nan", "model.optimizer momentum=nan is not a finite number"),
    ("--data.mixer.init_args.alpha", "nan", "data.mixer.init_args.alpha: Expected a <class 'float'>"),
    ("--data.mixer.init_args.prob", "inf", "data.mixer.init_args.prob: Expected a <class 'float'>"),
])
def test_a_value_with_no_finite_meaning_names_its_key_and_fix(flag, value, expected, tiny_cifar, in_tmp, capsys):
    line = fails(capsys, *quick(tiny_cifar, flag, value))
    assert expected in line and "fix:" in line
    assert not (in_tmp / "runs").exists()


# -- what TensorBoard and the terminal show ---------------------------------------------------------------------
def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_two_tests_of_a_run_show_one_result(run, tiny_cifar, in_tmp):
    main(["test", *evals(tiny_cifar, run)])
    main(["test", *evals(tiny_cifar, run)])
    assert len(scalars(run / "test", "test/acc")) == 1, "the second test's result replaces the first's"


def test_a_resumed_run_shows_the_uninterrupted_hp_metric_and_its_own_paths(tiny_cifar, in_tmp, capsys):
    whole = Path(main(quick(tiny_cifar, "--trainer.max_epochs", "2")).trainer.log_dir)
    cli = main(quick(tiny_cifar))
    part = Path(cli.trainer.log_dir)
    assert get_standard_metrics(cli.trainer)["v_num"] == 1
    capsys.readouterr()
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", str(part)))
    assert get_standard_metrics(cli.trainer)["v_num"] == 1
    err = capsys.readouterr().err
    assert "cutmix-pl: run runs/smoke/version_1\n" in err and "continues in runs/smoke/version_1)" in err
    assert [s for s, _ in scalars(part, "hp_metric")] == [s for s, _ in scalars(whole, "hp_metric")]
    assert [v for _, v in scalars(part, "hp_metric")].count(-1.0) == 1


def test_evaluations_print_where_they_wrote(run, tiny_cifar, in_tmp, capsys):
    for sub in ("validate", "test", "predict"):
        main([sub, *evals(tiny_cifar, run)])
        err = capsys.readouterr().err
        assert f"cutmix-pl: {sub} wrote runs/smoke/version_0/{sub} (TensorBoard: tensorboard --logdir runs/smoke)" in err


# -- named recipes --------------------------------------------------------------------------------------------
def test_config_by_name_is_the_packaged_recipe(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "smoke", "--print_config"])
    assert "name: smoke" in capsys.readouterr().out
    (in_tmp / "smoke").write_text("trainer:\n  max_epochs: 7\n")  # a file of that name here wins
    with pytest.raises(SystemExit):
        main(["fit", "--config=smoke", "--print_config"])
    assert "max_epochs: 7" in capsys.readouterr().out
    line = fails(capsys, "fit", "--config", "smoek")
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    assert f"--config smoek: no such file, and no packaged recipe of that name ({names}); fix:" in line


def test_a_run_resumed_mid_epoch_shows_the_epoch_and_its_length(tiny_cifar, steps_config, in_tmp, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    run = Path(main(["fit", *small(tiny_cifar), "--config", str(steps_config)]).trainer.log_dir).absolute()
    seen: list[tuple[str, object, int]] = []
    real = TQDMProgressBar.on_train_batch_end

    def spy(self, trainer, *args):
        real(self, trainer, *args)
        seen.append((self.train_progress_bar.desc, self.train_progress_bar.total, self.train_progress_bar.n))

    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", spy)
    main(["fit", *small(tiny_cifar), "--config", str(steps_config), "--trainer.enable_progress_bar", "true",
          "--ckpt_path", str(run / "checkpoints" / "step004.ckpt")])  # epoch 0, 4 of its 6 batches done
    assert seen[0] == ("Epoch 0: ", 6, 5), seen[:3]  # not "Training: 5/?"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_command_has_succeeded_keeps_its_exit_status_zero(sig, tiny_cifar, in_tmp):
    """Low: a stop during the interpreter's shutdown after a finished fit ended it with 128 + the signal, silently."""
    shutdown = "import atexit, sys, time; atexit.register(time.sleep, 30); from cutmix_pl.__main__ import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", shutdown, *quick(tiny_cifar)], cwd=in_tmp, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    while not any(line.startswith("  TensorBoard:") for line in lines):  # the fit's last line: it has succeeded
        lines.append(proc.stderr.readline())
        assert lines[-1] or proc.poll() is None, "".join(lines)[-3000:]
    time.sleep(0.5)  # in the atexit pause now, as in torch's shutdown
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0
    assert proc.stderr.read() == "", "nothing after the fit's own lines (a KeyboardInterrupt traceback)"
    assert (in_tmp / "runs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see the import under way")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_imports_torch_is_one_line(sig, in_tmp):
    """Low: Ctrl-C during the imports printed a KeyboardInterrupt traceback (SIGTERM: a silent kill)."""
    proc = subprocess.Popen([sys.executable, "-m", "cutmix_pl", "fit", "--help"], cwd=in_tmp, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # torch is being imported now
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert err.strip().splitlines() == [f"cutmix-pl: stopped by {sig.name} while starting; nothing was written"]
    assert out == "" and list(in_tmp.iterdir()) == []
