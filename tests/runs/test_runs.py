"""The run machinery's parts on their own (runs/disk, rules, folder): claiming run folders, the run lock, what a resume may change, which run `last` means."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
import yaml

from cutmix_pl import runs
from cutmix_pl.runs import disk, folder, rules


def write_progress(ckpt: Path, epochs: int, step: int) -> None:
    """A checkpoint holding only what a run's progress is read from (Lightning's epoch loop and global step)."""
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": epochs}}}}},
               ckpt)


def make_run(folder: Path, config: dict, finished: bool = False) -> Path:
    """A run of ``config``: its last.ckpt at the end of its max_epochs when finished, else after one epoch."""
    epochs = config["trainer"]["max_epochs"] if finished else 1
    write_progress(folder / "checkpoints" / "last.ckpt", epochs, 6 * epochs)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


CONFIG = {"seed_everything": 0, "trainer": {"max_epochs": 10, "logger": {"init_args": {"version": "version_0"}}},
          "model": {"depth": 20, "optimizer": {"init_args": {"lr": 0.1}}}, "data": {"batch_size": 128}}


def changed(**edits: object) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(CONFIG))
    for key, value in edits.items():
        node = cfg
        *path, leaf = key.split("__")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


def test_claims_are_distinct_under_a_race(tmp_path):
    base = tmp_path / "runs" / "x"
    (base / "version_3").mkdir(parents=True)
    (base / "notes").mkdir()
    got: list[Path] = []
    barrier = threading.Barrier(12)

    def claim() -> None:
        barrier.wait()
        got.append(folder.claim_version(base))

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got) == sorted(f"version_{n}" for n in range(4, 16))
    assert all(p.is_dir() for p in got)


def test_lock_refuses_a_second_holder_until_released(tmp_path):
    first = folder.Claim(tmp_path, False, None, None)
    with pytest.raises(ValueError, match=r"is in use by another running command \(pid \d+\)"):
        folder.Claim(tmp_path, False, None, None)
    first.release()
    folder.Claim(tmp_path, False, None, None).release()  # free again


def test_changed_settings_lists_what_a_resume_may_not_change():
    assert rules.changed_settings(CONFIG, changed()) == []
    # how long, where the data is, how to log: allowed
    assert rules.changed_settings(CONFIG, changed(trainer__max_epochs=20, trainer__logger={"init_args": {}})) == []
    got = rules.changed_settings(CONFIG, changed(model__optimizer={"init_args": {"lr": 0.01}}, data__batch_size=32))
    assert got == [("data.batch_size", 128, 32), ("model.optimizer.init_args.lr", 0.1, 0.01)]
    assert rules.changed_settings(CONFIG, changed(seed_everything=1)) == [("seed_everything", 0, 1)]
    # a setting that disappears (mixer: null) or appears counts as a change; 1e-12 of float noise does not
    with_mixer = changed(data__mixer={"class_path": "CutMix"})
    assert rules.changed_settings(with_mixer, changed()) == [("data.mixer.class_path", "CutMix", None)]
    assert rules.changed_settings(CONFIG, changed(model__optimizer={"init_args": {"lr": 0.1 + 1e-12}})) == []


def test_a_mixers_null_num_classes_matches_the_number_an_older_run_recorded():
    """Runs started while a mixer's num_classes defaulted to 10 recorded it; today's commands carry null (the
    data's)."""
    def with_mixer(**init_args: object) -> dict:
        return changed(data__mixer={"class_path": "cutmix_pl.augment.CutMixUp", "init_args": {
            "cutmix": {"class_path": "cutmix_pl.augment.CutMix", "init_args": {"alpha": 1.0, **init_args}},
            "mixup": {"class_path": "cutmix_pl.augment.MixUp", "init_args": dict(init_args)}, **init_args}})

    assert rules.changed_settings(with_mixer(num_classes=10), with_mixer(num_classes=None)) == []
    plain = changed(data__mixer={"class_path": "cutmix_pl.augment.CutMix", "init_args": {"num_classes": 10}})
    assert rules.changed_settings(plain, changed(data__mixer={"init_args": {"num_classes": None}})) == [
        ("data.mixer.class_path", "cutmix_pl.augment.CutMix", None)]  # the null matches; the class still counts
    # another number, asked for, is a change; so is a null elsewhere
    assert rules.changed_settings(with_mixer(num_classes=10), with_mixer(num_classes=100)) == [
        (f"data.mixer.init_args.{k}num_classes", 10, 100)
        for k in ("cutmix.init_args.", "mixup.init_args.", "")]
    assert rules.changed_settings(with_mixer(prob=0.5), with_mixer(prob=None)) == [
        (f"data.mixer.init_args.{k}prob", 0.5, None) for k in ("cutmix.init_args.", "mixup.init_args.", "")]


def test_a_data_argument_newer_than_the_run_counts_as_unchanged_at_its_default():
    """data.dataset, data.image_size, ... came after some runs: their config.yaml lacks them."""
    new = changed(data__dataset="cifar10", data__image_size=None, data__cifar100_labels="fine", data__cache_dir=None)
    assert rules.changed_settings(CONFIG, new) == []  # the DataModule's own defaults, read from its signature
    assert rules.changed_settings(CONFIG, changed(data__dataset="cifar100", data__cifar100_labels="fine")) == [
        ("data.dataset", None, "cifar100")]
    assert rules.changed_settings(CONFIG, changed(data__dataset="x"), defaults={"dataset": "x"}) == []
    # recorded by the run, the value is compared as always; outside data, or nested, absence is a change
    assert rules.changed_settings(changed(data__dataset="cifar100"), new) == [("data.dataset", "cifar100", "cifar10")]
    assert rules.changed_settings(CONFIG, changed(model__dataset="cifar10")) == [("model.dataset", None, "cifar10")]
    assert rules.changed_settings(CONFIG, changed(data__mixer={"dataset": "cifar10"})) == [
        ("data.mixer.dataset", None, "cifar10")]


def test_flatten_keeps_list_positions():
    flat = rules.flatten({"trainer": {"callbacks": [{"a": 1}, {"b": {"c": 2}}]}, "x": [1, 2]})
    assert flat == {"trainer.callbacks.0.a": 1, "trainer.callbacks.1.b.c": 2, "x": [1, 2]}


def test_saved_config_is_the_newest_restart(tmp_path):
    run = make_run(tmp_path / "v", CONFIG)
    (run / "config.resume2.yaml").write_text(yaml.safe_dump(changed(trainer__max_epochs=30)))
    (run / "config.resume10.yaml").write_text(yaml.safe_dump(changed(trainer__max_epochs=40)))
    assert disk.saved_config(run)["trainer"]["max_epochs"] == 40


def test_last_is_the_one_unfinished_run_with_these_settings(tmp_path):
    base = tmp_path / "runs" / "cutmix"
    make_run(base / "version_0", CONFIG, finished=True)
    other = make_run(base / "version_1", changed(model__optimizer={"init_args": {"lr": 0.05}}))
    mine = make_run(base / "version_2", CONFIG)
    assert rules.find_resumable(base, disk.survey(base), changed()).folder == mine
    assert rules.find_resumable(base, disk.survey(base), changed(model__optimizer={"init_args": {"lr": 0.05}})).folder == other
    with pytest.raises(ValueError) as err:  # a third experiment: nothing to resume, and the candidates say why
        rules.find_resumable(base, disk.survey(base), changed(data__batch_size=64)).folder
    msg = str(err.value)
    assert "found no run" in msg and "version_2: data.batch_size (128 -> 64)" in msg and "fix:" in msg
    assert "\n" not in msg
    make_run(base / "version_3", CONFIG)
    with pytest.raises(ValueError, match="ambiguous: 2 unfinished runs.*version_2.*version_3.*fix: pass --ckpt_path"):
        rules.find_resumable(base, disk.survey(base), changed()).folder


def test_last_of_a_finished_run_says_how_to_extend_it(tmp_path):
    base = tmp_path / "runs" / "cutmix"
    done = make_run(base / "version_0", CONFIG, finished=True)
    with pytest.raises(ValueError, match=rf"continues unfinished runs only, and the run with this config, {done}, "
                                         rf"has finished; fix: to train it longer, pass --ckpt_path {done} \(with"):
        rules.find_resumable(base, disk.survey(base), changed()).folder


def test_last_without_runs_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        disk.read("fit", "last", Path("runs/cutmix"), None)
    assert f"found no run with a last.ckpt in {tmp_path}/runs/cutmix" in str(err.value)
    assert "run from the folder that holds the runs" in str(err.value)


def test_newest_last_for_evaluation(tmp_path):
    base = tmp_path / "runs"
    a = make_run(base / "version_0", CONFIG)
    b = make_run(base / "version_1", CONFIG)
    os.utime(a / "checkpoints" / "last.ckpt", (2e9, 2e9))  # newer, though the lower version
    assert disk.newest_last(base) == a / "checkpoints" / "last.ckpt"
    assert b.is_dir()


def test_run_of_checkpoint(tmp_path):
    assert disk.run_of_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt") == tmp_path / "r"
    assert disk.run_of_checkpoint(tmp_path / "downloads" / "model.ckpt") == tmp_path / "downloads"


def test_remove_failed_keeps_runs_that_saved_a_last_ckpt(tmp_path):
    top = tmp_path / "runs"
    run = top / "x" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("a: 1")
    assert folder.remove_failed(run, None, top) is False
    assert not top.exists(), "a folder this command created goes, with the empty parents it created"
    run.mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best-epoch000.ckpt").write_bytes(b"x")  # a full disk before last.ckpt: nothing to resume
    assert folder.remove_failed(run, None, top) is False and not top.exists()
    write_progress(run / "checkpoints" / "last.ckpt", 1, 6)
    before = folder.snapshot(run)
    (run / "config.resume1.yaml").write_text("a: 2")
    (run / "test").mkdir()
    assert folder.remove_failed(run, before, top) is True
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "last.ckpt"], "only what this command added goes"
    (run / "config.resume1.yaml").write_text("a: 2")
    os.utime(run / "checkpoints" / "last.ckpt", ns=(1, 1))  # it trained on and saved: everything stays
    assert folder.remove_failed(run, before, top) is True and (run / "config.resume1.yaml").is_file()


def test_a_failed_resume_leaves_an_evaluation_written_beside_it(tmp_path):
    # test/validate/predict of a run write into <run>/<command>/ under a lock of their own, while a resume may run
    run = tmp_path / "runs" / "x" / "version_0"
    write_progress(run / "checkpoints" / "last.ckpt", 1, 6)
    before = folder.snapshot(run)
    (run / "config.resume1.yaml").write_text("a: 2")
    (run / "test").mkdir()
    (run / "test" / folder.LOCK).write_text("123")
    (run / "test" / "config.yaml").write_text("b: 1")
    assert folder.remove_failed(run, before) is True
    assert not (run / "config.resume1.yaml").exists() and (run / "test" / "config.yaml").is_file()


def test_finished_is_read_from_last_ckpt_and_the_newest_config(tmp_path):
    run = make_run(tmp_path / "v", CONFIG, finished=True)
    assert runs.is_finished(run)
    (run / "config.resume1.yaml").write_text(yaml.safe_dump(changed(trainer__max_epochs=30)))  # an extension...
    assert not runs.is_finished(run)  # ...that saved no checkpoint yet
    (run / "config.resume1.yaml").unlink()
    max_steps = changed(trainer__max_steps=60, trainer__max_epochs=-1)
    (run / "config.resume1.yaml").write_text(yaml.safe_dump(max_steps))
    assert runs.is_finished(run)  # 10 epochs of 6 steps: step 60
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="last.ckpt cannot be read"):
        runs.is_finished(run)


def test_a_damaged_sibling_is_a_named_candidate_not_a_traceback(tmp_path):
    base = tmp_path / "runs" / "cutmix"
    broken = make_run(base / "version_0", CONFIG)
    (broken / "config.resume1.yaml").write_text("trainer: [1,\n")
    unreadable = make_run(base / "version_1", changed(data__batch_size=32))
    (unreadable / "checkpoints" / "last.ckpt").write_bytes(b"x")
    mine = make_run(base / "version_2", changed(data__batch_size=64))
    assert rules.find_resumable(base, disk.survey(base), changed(data__batch_size=64)).folder == mine
    with pytest.raises(ValueError) as err:
        rules.find_resumable(base, disk.survey(base), changed(data__batch_size=32)).folder
    msg = str(err.value)
    assert "version_0: " in msg and "config.resume1.yaml cannot be read (ParserError)" in msg
    assert "version_1: " in msg and "last.ckpt cannot be read" in msg and "\n" not in msg


def test_run_options_are_the_model_keys_a_resume_may_change():
    assert rules.run_options() == ("compile", "channels_last", "tta_flip", "log_images", "grid_size")
    assert all(rules.may_change(f"model.{k}") for k in rules.run_options())
    assert not rules.may_change("model.label_smoothing") and rules.may_change("trainer.callbacks.3.init_args.save_last")


def test_a_checkpoint_callbacks_save_last_may_change_but_its_monitor_may_not():
    """Runs started while the recipe's ModelCheckpoint had save_last: true resume under today's recipe."""
    def with_callback(**init_args: object) -> dict:
        cfg = changed()
        cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                        "init_args": {"monitor": "val/acc", **init_args}}]
        return cfg

    assert rules.changed_settings(with_callback(save_last=True), with_callback(save_last=None)) == []
    assert rules.changed_settings(with_callback(save_last=True), with_callback(save_last=True, monitor="val/loss")) == [
        ("trainer.callbacks.0.init_args.monitor", "val/acc", "val/loss")]


@pytest.mark.parametrize("env,marked", [
    ({"NODE_RANK": "1"}, True), ({"GROUP_RANK": "2"}, True),  # the first process of another node
    ({"NODE_RANK": "0"}, False), ({}, False),  # the first node
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"NODE_RANK": "1", "RANK": "4"}, False),  # ranks already known
    ({"NODE_RANK": "one"}, False),  # Lightning's own check names it
    ({"NODE_RANK": "1", "nodes": 1}, False),  # a NODE_RANK left in a one-node run's environment
])
def test_the_first_process_of_another_node_is_not_rank_zero(env, marked, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from cutmix_pl.runs import other_node_not_rank_zero

    for key in ("NODE_RANK", "GROUP_RANK", "RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    nodes = env.pop("nodes", 2)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert other_node_not_rank_zero(nodes) is marked
    assert (rank_zero_only.rank != 0) is marked


def test_a_shared_folder_is_checked_only_where_a_fit_writes(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").symlink_to(tmp_path / "gone.yaml")  # a dangling link: a write would still follow it
    (tmp_path / "data").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "checkpoints" / "last.ckpt").symlink_to(tmp_path / "gone.ckpt")
    for name in (".config.yaml.0a1b.tmp", ".draft.txt.1.tmp"):
        (tmp_path / name).write_text("")
    names = {p.name for p in folder.symlinks_in(tmp_path, folder.FIT_FILES)}
    assert names == {"config.yaml", "last.ckpt"}
    assert {p.name for p in folder.symlinks_in(tmp_path)} == names | {"data"}  # a run folder: every link
    folder.clear_temporary(tmp_path, folder.FIT_FILES)
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".draft.txt.1.tmp"]
    folder.clear_temporary(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
