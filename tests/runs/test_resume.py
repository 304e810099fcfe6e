"""Trustworthy runs through the CLI: interrupt and resume any number of times, `--ckpt_path last` picks the run it is
asked to, a resume refuses changed settings, evaluation writes into the checkpoint's run, predict writes a file,
concurrent fits never share a folder, and a kill during a checkpoint save leaves a checkpoint that resumes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import warnings
from collections import Counter
from unittest import mock
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cutmix_pl import runs
from cutmix_pl.runs import folder
from cutmix_pl.cli import main
from cutmix_pl.module import ImageClassifier

from cli_runs import (assert_same_metrics, assert_same_training_state, ckpt, fails, files_under,
                      finish, kept_checkpoints, small, spawn, wait_paused)


def event_values(run: Path, tag: str) -> list[float]:
    return [e.value for e in EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars(tag)]


def event_steps(run: Path) -> dict[str, list[int]]:
    """Each scalar tag's steps as TensorBoard shows them (all event files of the run folder, purges applied)."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow(seconds=35)
def test_three_interrupts_end_where_an_uninterrupted_run_ends(reference_run, tiny_cifar, steps_config, tmp_path):
    args = ["fit", *small(tiny_cifar), "--config", str(steps_config)]
    run = tmp_path / "runs" / "smoke" / "version_0"
    stops = [(None, 2, signal.SIGINT), ("last", 5, signal.SIGTERM), ("last", 9, signal.SIGHUP)]
    for k, (resume, pause, sig) in enumerate(stops):
        tag = f"part{k}"
        proc = spawn(tmp_path, args + (["--ckpt_path", resume] if resume else []), pause_at=pause, tag=tag)
        wait_paused(proc, tmp_path, tag=tag)
        proc.send_signal(sig)
        assert finish(proc) == 128 + sig, (tmp_path / f"{tag}.err").read_text()[-3000:]
        assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == pause + 1, "last.ckpt is the newest state"
    final = spawn(tmp_path, [*args, "--ckpt_path", "last"], tag="final")
    assert finish(final) == 0, (tmp_path / "final.err").read_text()[-3000:]

    ref = reference_run / "runs" / "smoke" / "version_0"
    assert_same_training_state(ref / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert_same_metrics(reference_run / "metrics.json", tmp_path / "metrics.json")
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], "every resume went on in the run's folder"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (ref / "checkpoints").iterdir()), "exactly one last.ckpt, no last-v1"
    got, want = event_steps(run), event_steps(ref)
    for tag in ("train/loss", "train/lr", "val/acc", "val/loss"):
        assert got[tag] == want[tag], f"{tag}: steps {got[tag]} vs uninterrupted {want[tag]}"
    for tag in ("train/loss_epoch", "train/acc_dominant"):  # each epoch's mean over all its batches
        assert event_values(run, tag) == pytest.approx(event_values(ref, tag), abs=1e-6), tag
    assert len(list(run.glob("events.out.tfevents.*"))) == 4 and (run / "config.resume3.yaml").is_file()


def test_signal_in_the_last_validation_still_stops_non_zero(tiny_cifar, tmp_path):
    proc = spawn(tmp_path, ["fit", *small(tiny_cifar)], PAUSE_IN_LAST_VAL="1")
    wait_paused(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == 128 + signal.SIGINT
    err = (tmp_path / "run.err").read_text().strip().splitlines()
    assert err[-1].startswith("cutmix-pl: stopped by SIGINT after global step 12 (epoch 1"), err[-1]
    assert ckpt(tmp_path / "runs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 12


def test_kill_during_a_checkpoint_save_leaves_a_last_ckpt_that_resumes(reference_run, tiny_cifar, steps_config,
                                                                     tmp_path):
    """The run folder on a tmpfs of its own when the tests may mount one (as on a cluster's shared disk)."""
    shared = tmp_path / "shared_disk"
    shared.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(shared)],
                                                   capture_output=True).returncode == 0
    try:
        args = ["fit", *small(tiny_cifar), "--config", str(steps_config),
                "--trainer.logger.init_args.save_dir", str(shared / "runs")]
        run = shared / "runs" / "smoke" / "version_0"
        # saves: step004.ckpt, last.ckpt (step 4), last.ckpt (step 6, the epoch's end): die inside the third
        proc = spawn(tmp_path, args, KILL_IN_SAVE="3")
        assert finish(proc) == -signal.SIGKILL
        assert "last.ckpt" in (tmp_path / "killed_in_save").read_text()
        assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4, "the previous last.ckpt is intact"
        resumed = spawn(tmp_path, [*args, "--ckpt_path", "last"], tag="resume")
        assert finish(resumed) == 0, (tmp_path / "resume.err").read_text()[-3000:]
        ref = reference_run / "runs" / "smoke" / "version_0"
        assert_same_training_state(ref / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
        assert not list((run / "checkpoints").glob(".*.tmp")), "the killed save's temporary file is cleared"
    finally:
        if mounted:
            subprocess.run(["umount", str(shared)], check=False)


# ----------------------------------------------------------------------------------------------------------------
# which run `--ckpt_path last` means, and what a resume may change (in-process, tiny runs)
# ----------------------------------------------------------------------------------------------------------------
def quick(data: Path, *extra: str) -> list[str]:
    return ["fit", *small(data), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", *extra]


def unfinish(run: Path) -> Path:
    """Make a finished run look interrupted, as a Ctrl-C would leave it: its newest config asks for more epochs than
    its last.ckpt holds."""
    newest = max(run.glob("config*.yaml"), key=lambda p: int(p.stem.partition("resume")[2] or 0))
    config = yaml.safe_load(newest.read_text())
    config["trainer"]["max_epochs"] = 10
    newest.write_text(yaml.safe_dump(config))
    return run


def test_last_resumes_the_experiment_it_is_asked_to(tiny_cifar, in_tmp, capsys):
    a = unfinish(Path(main(quick(tiny_cifar)).trainer.log_dir))
    b = unfinish(Path(main(quick(tiny_cifar, "--model.optimizer.init_args.lr", "0.05")).trainer.log_dir))
    assert (a.name, b.name) == ("version_0", "version_1")
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert Path(cli.trainer.log_dir) == a.absolute() and cli.trainer.global_step == 4
    cli = main(quick(tiny_cifar, "--model.optimizer.init_args.lr", "0.05", "--ckpt_path", "last"))
    assert Path(cli.trainer.log_dir) == b.absolute()
    unfinish(a)
    unfinish(b)
    line = fails(capsys, *quick(tiny_cifar, "--data.mixer", "null", "--ckpt_path", "last"))
    assert "found no run in runs/smoke with this command's settings" in line
    assert "version_0: data.mixer" in line and "version_1: data.mixer" in line
    other = in_tmp / "elsewhere"
    other.mkdir()
    os.chdir(other)
    line = fails(capsys, *quick(tiny_cifar, "--ckpt_path", "last"))
    assert f"in {other}/runs/smoke (relative to the working directory {other})" in line
    assert not (other / "runs").exists()


def test_resume_applies_max_epochs_and_records_it(tiny_cifar, in_tmp):
    run = unfinish(Path(main(quick(tiny_cifar)).trainer.log_dir))
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "3", "--ckpt_path", str(run)))
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 6
    assert "max_epochs: 3" in (run / "config.resume1.yaml").read_text()
    assert runs.is_finished(run)


def test_a_checkpoint_folder_outside_the_run_is_the_resumed_runs_own_and_refused_to_a_new_run(tiny_cifar, in_tmp,
                                                                                               capsys):
    kept = kept_checkpoints("kept")
    run = Path(main(quick(tiny_cifar, *kept)).trainer.log_dir)
    main(quick(tiny_cifar, *kept, "--trainer.max_epochs", "2", "--ckpt_path", str(run)))
    assert sorted(p.name for p in Path("kept").glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    before = files_under(in_tmp)
    line = fails(capsys, *quick(tiny_cifar, *kept))
    assert f"{in_tmp / 'kept'} already holds the checkpoints of an earlier run" in line and "fix:" in line
    assert files_under(in_tmp) == before, "the refused run wrote nothing"
    # a fit elsewhere from the run's checkpoint is a new run, not the run: the run's folders are not its own
    line = fails(capsys, *quick(tiny_cifar, *kept, "--trainer.max_epochs", "3", "--trainer.logger", "false",
                                "--trainer.default_root_dir", "fork", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")))
    assert f"{in_tmp / 'kept'} already holds the checkpoints of an earlier run" in line
    assert files_under(in_tmp / "kept") == {k[5:]: v for k, v in before.items() if k.startswith("kept/")}


def test_a_run_seeded_with_true_resumes_with_the_seed_it_chose(tiny_cifar, in_tmp, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(True) then chooses
    run = unfinish(Path(main(quick(tiny_cifar, "--seed_everything", "true")).trainer.log_dir))
    assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")  # a later shell: true would now choose another seed
    cli = main(quick(tiny_cifar, "--seed_everything", "true", "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert Path(cli.trainer.log_dir) == run and cli.trainer.global_step == 4
    assert yaml.safe_load((run / "config.resume1.yaml").read_text())["seed_everything"] == 7
    assert cli.datamodule._seed() == 7  # the data order the run started with


@pytest.mark.parametrize("change,key", [
    (["--model.optimizer.init_args.lr", "0.01"], "model.optimizer.init_args.lr (0.1 -> 0.01)"),
    (["--model.warmup_epochs", "0"], "model.warmup_epochs (1.0 -> 0.0)"),
    (["--data.batch_size", "32"], "data.batch_size (16 -> 32)"),
    (["--data.mixer", "null"], "data.mixer.class_path ('cutmix_pl.augment.CutMix' -> None)"),
])
def test_resume_refuses_a_changed_setting_by_name(change, key, tiny_cifar, in_tmp, capsys):
    run = unfinish(Path(main(quick(tiny_cifar)).trainer.log_dir))
    before = files_under(run)
    line = fails(capsys, *quick(tiny_cifar, *change, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")))
    assert f"cannot resume {run.absolute()} with changed settings: {key}" in line and "fix:" in line
    assert files_under(run) == before, "a refused resume writes nothing into the run"


def test_a_checkpoint_outside_its_run_refuses_other_model_settings_and_names_the_ones_it_brings(tiny_cifar, in_tmp,
                                                                                                   capsys):
    run = Path(main(quick(tiny_cifar, "--model.optimizer.init_args.lr", "0.05")).trainer.log_dir)
    loose = in_tmp / "copied" / "model.ckpt"  # no config.yaml beside it to compare the command with
    loose.parent.mkdir()
    loose.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    before = files_under(in_tmp / "runs")
    line = fails(capsys, *quick(tiny_cifar, "--model.label_smoothing", "0.3", "--model.warmup_epochs", "0",
                                "--trainer.max_epochs", "2", "--ckpt_path", str(loose)))
    assert ("but this command asks for others: model.label_smoothing (0.0 there, 0.3 asked), model.warmup_epochs "
            "(1.0 there, 0.0 asked); fix:") in line
    assert files_under(in_tmp / "runs") == before, "a refused command writes nothing"
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", str(loose)))
    assert "model.optimizer.init_args.lr=0.05 from the checkpoint" in capsys.readouterr().err
    assert cli.trainer.optimizers[0].defaults["lr"] == 0.05 and cli.trainer.global_step == 4


def test_a_second_concurrent_resume_is_refused(tiny_cifar, in_tmp, capsys):
    run = unfinish(Path(main(quick(tiny_cifar)).trainer.log_dir))
    holder = folder.Claim(run, False, None, None)  # as the fit that is still running holds it
    try:
        line = fails(capsys, *quick(tiny_cifar, "--ckpt_path", "last"))
    finally:
        holder.release()
    assert f"{run.absolute()} is in use by another running command (pid {os.getpid()})" in line


def test_fit_prints_where_the_run_is(tiny_cifar, in_tmp, capsys):
    main(quick(tiny_cifar))
    err = capsys.readouterr().err
    assert "cutmix-pl: run runs/smoke/version_0\n" in err
    assert "checkpoints: runs/smoke/version_0/checkpoints" in err and "tensorboard --logdir runs/smoke" in err


def test_last_ckpt_is_the_last_epoch_when_an_earlier_one_was_best(tiny_cifar, in_tmp, monkeypatch):
    # The first epoch's validation is made perfect (val/acc 1.0), so no later epoch beats it and the recipe's
    # ModelCheckpoint(monitor=val/acc) keeps epoch 0 as best: last.ckpt must still be the final state.
    real = ImageClassifier._eval_step

    def perfect_first_epoch(self, stage, batch):
        if stage == "val" and self.current_epoch == 0:
            one_hot = F.one_hot(batch[1], 10).float()
            with mock.patch.object(ImageClassifier, "_predict_logits", lambda module, images: one_hot):
                return real(self, stage, batch)
        return real(self, stage, batch)

    monkeypatch.setattr(ImageClassifier, "_eval_step", perfect_first_epoch)
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "3"))
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = ckpt(folder / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6) == (cli.trainer.current_epoch - 1, cli.trainer.global_step)
    assert ckpt(folder / "best-epoch000.ckpt")["global_step"] == 2


@pytest.mark.parametrize("schedule,steps", [
    (["--trainer.check_val_every_n_epoch", "2"], 2),  # epochs 0 and 2 end without a validation
    (["--trainer.check_val_every_n_epoch", "5"], 2),  # no validation at all
    (["--trainer.val_check_interval", "2", "--trainer.limit_train_batches", "3"], 3),  # mid-epoch validations only
])
def test_last_ckpt_is_the_final_state_whatever_the_validation_schedule(schedule, steps, tiny_cifar, in_tmp):
    cli = main(quick(tiny_cifar, "--trainer.max_epochs", "3", *schedule))
    run = Path(cli.trainer.log_dir)
    last = ckpt(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 3 * steps) == (cli.trainer.current_epoch - 1,
                                                                      cli.trainer.global_step)
    assert runs.is_finished(run)


# ----------------------------------------------------------------------------------------------------------------
# evaluation writes into the checkpoint's run; predict writes its file
# ----------------------------------------------------------------------------------------------------------------
def test_evaluation_writes_into_the_checkpoints_run(tiny_cifar, in_tmp, capsys):
    run = Path(main(quick(tiny_cifar, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "null"))
               .trainer.log_dir).absolute()
    ckpt_path = str(run / "checkpoints" / "last.ckpt")
    evals = ["--config", str(Path(small(tiny_cifar)[1])), *small(tiny_cifar)[2:], "--ckpt_path", ckpt_path,
             "--trainer.limit_test_batches", "null", "--trainer.limit_predict_batches", "null"]
    main(["validate", *evals])
    test = main(["test", *evals])
    capsys.readouterr()
    pred = main(["predict", *evals])
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], "no new version_N for evaluation"
    assert {p.name for p in run.iterdir() if p.is_dir()} == {"checkpoints", "validate", "test", "predict"}
    acc = float(test.trainer.callback_metrics["test/acc"])
    events = EventAccumulator(str(run / "test"), size_guidance={"scalars": 0}).Reload()
    assert events.Scalars("test/acc")[-1].value == pytest.approx(acc), "the test metrics are in the run's TensorBoard"
    assert "hp_metric" not in events.Tags()["scalars"], "no placeholder hp_metric (-1) beside the run's"

    target = run / "predict" / "predictions.csv"
    assert f"wrote the predictions to {target}" in capsys.readouterr().err
    with open(target, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = pred.datamodule.split("test").labels
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in pred.datamodule.classes] for r in rows])
    torch.testing.assert_close(probs.sum(1), torch.ones(len(rows)), atol=1e-4, rtol=0)
    assert [int(r["pred"]) for r in rows] == probs.argmax(1).tolist()
    recount = sum(int(r["pred"]) == int(r["label"]) for r in rows) / len(rows)
    assert recount == pytest.approx(acc), "the file's predictions give the test command's accuracy"


def test_the_predictions_line_starts_a_line_of_its_own_after_the_progress_bar(tiny_cifar, in_tmp):
    run = Path(main(quick(tiny_cifar)).trainer.log_dir).absolute()
    args = [*small(tiny_cifar, trainer__enable_progress_bar=True), "--ckpt_path", str(run)]
    # the bar (stdout) and our lines (stderr) in one stream, as a terminal shows them
    out = subprocess.run([sys.executable, "-m", "cutmix_pl", "predict", *args], cwd=in_tmp, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=300).stdout
    assert "Predicting DataLoader 0: 100%" in out, out[-2000:]
    line = next(x for x in out.replace("\r", "\n").splitlines() if "wrote the predictions" in x)
    assert line == f"cutmix-pl: wrote the predictions to {run / 'predict' / 'predictions.csv'}"


def test_an_evaluation_reads_the_data_folder_its_run_read(tiny_cifar, in_tmp, capsys):
    run = Path(main(quick(tiny_cifar)).trainer.log_dir)
    args = small(tiny_cifar)
    assert args[2:4] == ["--data.data_dir", str(tiny_cifar)]
    del args[2:4]  # data.data_dir left at its default, data/, which is not here
    capsys.readouterr()
    main(["test", *args, "--ckpt_path", str(run)])
    assert f"data.data_dir={str(tiny_cifar)!r} from the checkpoint" in capsys.readouterr().err
    assert yaml.safe_load((run / "test" / "config.yaml").read_text())["data"]["data_dir"] == str(tiny_cifar)


def test_evaluation_validates_on_the_runs_held_out_split(tiny_cifar, in_tmp, capsys):
    run = Path(main(quick(tiny_cifar, "--data.split_seed", "3")).trainer.log_dir).absolute()
    capsys.readouterr()
    # the recipe's split (val_size 50 of small(), split_seed 0) would hold images this run trained on
    cli = main(["validate", *small(tiny_cifar), "--ckpt_path", str(run)])
    err = capsys.readouterr().err
    assert "data.split_seed=3 from the checkpoint, not 0: the run's validation split" in err
    assert "data.val_size" not in err, "only what differs is named"
    dm, fit_dm = cli.datamodule, main(quick(tiny_cifar, "--data.split_seed", "3")).datamodule
    assert torch.equal(dm.split("val").images, fit_dm.split("val").images)
    assert "split_seed: 3" in (run / "validate" / "config.yaml").read_text()
    cli = main(["validate", *small(tiny_cifar), "--data.val_size", "0", "--data.split_seed", "3",
                "--ckpt_path", str(run)])
    assert "data.val_size=50 from the checkpoint, not 0" in capsys.readouterr().err
    assert len(cli.datamodule.split("val").labels) == 50


# ----------------------------------------------------------------------------------------------------------------
# concurrent fits
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow(seconds=11)
def test_fits_started_together_get_a_folder_each(tiny_cifar, tmp_path):
    procs = [spawn(tmp_path, quick(tiny_cifar), tag=f"p{i}") for i in range(3)]
    assert [finish(p) for p in procs] == [0, 0, 0], [(tmp_path / f"p{i}.err").read_text()[-2000:] for i in range(3)]
    folders = sorted((tmp_path / "runs" / "smoke").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1", "version_2"]
    for run in folders:
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    claimed = Counter(line.split()[2] for i in range(3)
                      for line in (tmp_path / f"p{i}.err").read_text().splitlines() if line.startswith("cutmix-pl: run "))
    assert sorted(claimed.values()) == [1, 1, 1]


# -- determinism and no overwriting ---------------------------------------------------------------------------------
def test_same_seed_same_metrics_and_runs_never_overwrite(tiny_cifar, in_tmp):
    first = main(["fit", *small(tiny_cifar)])
    run0 = Path(first.trainer.log_dir)
    before = files_under(run0)
    second = main(["fit", *small(tiny_cifar)])
    run1 = Path(second.trainer.log_dir)

    a = {k: float(v) for k, v in first.trainer.callback_metrics.items()}
    b = {k: float(v) for k, v in second.trainer.callback_metrics.items()}
    assert a == b, "same seed and config must give the same metrics"
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k

    assert (run0.name, run1.name) == ("version_0", "version_1")
    assert files_under(run0) == before, "the second run changed the first run's folder"
    # Pointing a new run at an old run's folder is refused, not an overwrite.
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *small(tiny_cifar), "--trainer.logger.init_args.version", "0"])
    assert exit_.value.code == 2
    assert files_under(run0) == before
    for run in (run0, run1):
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


# -- interruptions: SIGKILL then --ckpt_path last; SIGTERM and SIGINT stop with a checkpoint -------------------------
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference_run, tiny_cifar, steps_config, tmp_path):
    args = ["fit", *small(tiny_cifar), "--config", str(steps_config)]
    run = tmp_path / "runs" / "smoke" / "version_0"
    # Hold after step 5 (epoch 0, batch 4): the newest checkpoint is step 4's, mid-epoch 0; step 5 is lost.
    proc = spawn(tmp_path, args, pause_at=5)
    wait_paused(proc, tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step004.ckpt"]
    config_before = (run / "config.yaml").read_bytes()
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4

    resumed = spawn(tmp_path, [*args, "--ckpt_path", "last"], tag="resume")
    assert finish(resumed) == 0, (tmp_path / "resume.err").read_text()[-3000:]
    err = (tmp_path / "resume.err").read_text()
    assert "cutmix-pl: resuming" in err  # the states restored are compared below, not Lightning's log line

    ref = reference_run / "runs" / "smoke" / "version_0"
    assert_same_training_state(ref / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert_same_training_state(ref / "checkpoints" / "step008.ckpt", run / "checkpoints" / "step008.ckpt")
    assert_same_metrics(reference_run / "metrics.json", tmp_path / "metrics.json")
    for tag in ("train/loss_epoch", "train/acc_dominant"):  # epoch 0's means cover the batches before the kill too
        assert event_values(run, tag) == pytest.approx(event_values(ref, tag), abs=1e-6), tag
    # The run went on in its own folder: no version_1, the first config kept, the resumed one beside it.
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert (run / "config.yaml").read_bytes() == config_before and (run / "config.resume1.yaml").is_file()


@pytest.mark.slow(seconds=20)
def test_a_kill_between_an_epochs_checkpoint_and_its_logged_means_loses_none(reference_run, tiny_cifar,
                                                                            steps_config, tmp_path):
    # epoch 0's last.ckpt is saved after its validation; Lightning writes the epoch's training means after the
    # module's on_train_epoch_end, where this run is killed: the resume starts epoch 1 and must still write them
    args = ["fit", *small(tiny_cifar), "--config", str(steps_config)]
    run = tmp_path / "runs" / "smoke" / "version_0"
    proc = spawn(tmp_path, args, PAUSE_AT_EPOCH_END="0")
    wait_paused(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    assert ckpt(run / "checkpoints" / "last.ckpt")["epoch"] == 0
    resumed = spawn(tmp_path, [*args, "--ckpt_path", "last"], tag="resume")
    assert finish(resumed) == 0, (tmp_path / "resume.err").read_text()[-3000:]
    ref = reference_run / "runs" / "smoke" / "version_0"
    for tag in ("train/loss_epoch", "train/acc_dominant"):
        assert event_values(run, tag) == pytest.approx(event_values(ref, tag), abs=1e-6), tag
    assert event_steps(run)["train/loss_epoch"] == event_steps(ref)["train/loss_epoch"]


def test_a_signal_inside_a_gradient_accumulation_window_stops_at_its_end(tiny_cifar, tmp_path):
    # the gradients summed so far in a window are in no checkpoint: the stop waits for the window's optimizer step
    args = ["fit", *small(tiny_cifar), "--trainer.accumulate_grad_batches", "2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    reference = spawn(ref, args)
    proc = spawn(cut, args, pause_at=1)  # held after batch 1, the first window's end: the signal lands in batch 2
    wait_paused(proc, cut)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after global step 2 (epoch 0, batch 3)" in (cut / "run.err").read_text()
    assert finish(spawn(cut, [*args, "--ckpt_path", "last"], tag="resume")) == 0, (cut / "resume.err").read_text()
    assert finish(reference) == 0
    last = Path("runs", "smoke", "version_0", "checkpoints", "last.ckpt")
    assert_same_training_state(ref / last, cut / last)


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(reference_run, tiny_cifar, steps_config, tmp_path):
    args = ["fit", *small(tiny_cifar), "--config", str(steps_config)]
    run = tmp_path / "runs" / "smoke" / "version_0"
    # The signal lands after step 6, the last batch of epoch 0: the epoch's validation and its checkpoint come
    # first, then the run stops at the epoch's end (a stop before that validation would resume without it).
    proc = spawn(tmp_path, args, pause_at=6)
    wait_paused(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 128 + signal.SIGTERM
    lines = (tmp_path / "run.err").read_text().strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("cutmix-pl: stopped by SIGTERM after global step 6 (epoch 0, batch 5); saved ")
    assert lines[-1].endswith("resume: run the same command with --ckpt_path last")
    last = ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert len(events.Scalars("val/acc")) == 1, "epoch 0's validation ran before the stop"
    assert last["CIFAR10DataModule"]["epoch"] == 0 and last["CIFAR10DataModule"]["batches_done"] == 6

    resumed = spawn(tmp_path, [*args, "--ckpt_path", "last"], tag="resume")
    assert finish(resumed) == 0, (tmp_path / "resume.err").read_text()[-3000:]
    ref = reference_run / "runs" / "smoke" / "version_0"
    assert_same_training_state(ref / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert_same_metrics(reference_run / "metrics.json", tmp_path / "metrics.json")


@pytest.mark.parametrize(("sig", "where"), [(signal.SIGTERM, "PAUSE_IN_SETUP"), (signal.SIGINT, "PAUSE_IN_SETUP"),
                                           (signal.SIGTERM, "PAUSE_IN_READ")])  # read: never "a damaged batch file"
def test_a_signal_before_training_stops_in_one_line_and_leaves_no_run(sig, where, tiny_cifar, tmp_path):
    proc = spawn(tmp_path, ["fit", *small(tiny_cifar)], **{where: "1"})
    wait_paused(proc, tmp_path)
    assert (tmp_path / "runs" / "smoke" / "version_0").is_dir(), "the run had claimed its folder"
    proc.send_signal(sig)
    assert finish(proc) == 128 + sig
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"cutmix-pl: stopped by {sig.name} outside training"), err[-2000:]
    assert "corrupt" not in err
    assert not (tmp_path / "runs").exists(), "the run folder it had claimed is removed"


def test_sigint_saves_a_checkpoint_and_exits_130(tiny_cifar, tmp_path):
    proc = spawn(tmp_path, ["fit", *small(tiny_cifar)], pause_at=3)
    wait_paused(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == 128 + signal.SIGINT
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err and "weights_only" not in err  # the save asks for the full state: no notice
    assert err.strip().splitlines()[-1].startswith("cutmix-pl: stopped by SIGINT after global step 4 (epoch 0, batch 3)")
    last = ckpt(tmp_path / "runs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["CIFAR10DataModule"]["batches_done"] == 4


def test_a_fit_without_a_logger_stopped_by_a_signal_names_the_checkpoint_to_resume(tiny_cifar, in_tmp, monkeypatch,
                                                                                 capsys):
    # --ckpt_path last looks for runs in the logger's folder, which a fit with logger false does not have
    args = quick(tiny_cifar, "--trainer.logger", "false", "--trainer.limit_train_batches", "4")
    with monkeypatch.context() as m:
        m.setattr(ImageClassifier, "on_train_batch_end", lambda self, *_: self.global_step == 1 and os.kill(
            os.getpid(), signal.SIGTERM), raising=False)
        with pytest.raises(SystemExit) as stopped:
            main(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    last = in_tmp / "checkpoints" / "last.ckpt"
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"resume: run the same command with --ckpt_path {last}"), line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main([*args, "--ckpt_path", str(last)])  # the line's advice works
    assert cli.trainer.global_step == 4
    assert not [w for w in caught if "is not empty" in str(w.message)], "its own checkpoints are no surprise"
