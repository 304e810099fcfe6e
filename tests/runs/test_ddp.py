"""DDP on CPU (gloo), 2 processes, through the real CLI in subprocesses: shards, augmentation, metrics, files,
resume, a launch through ``torchrun``, and two "nodes" each started by Lightning's own launcher.

Lightning's ``ddp`` strategy re-launches ``sys.argv`` for the other ranks, so every multi-process run here is a
``python -m cutmix_pl`` subprocess. tests/ddp_probe.py (on PYTHONPATH) records, per rank, the shard, the labels
and CutMix lambdas of every training batch and the logged metrics into ``probe/rank<r>.json``.

Three 2-process runs, shared by the tests through module-scoped fixtures:
  * ``ref``: 2 epochs with Lightning's launcher (the reference run);
  * ``tr``: 1 epoch launched by ``torchrun --standalone --nproc_per_node 2`` (Lightning must not re-launch);
  * ``resumed``: ``tr``'s last.ckpt continued to 2 epochs with Lightning's launcher.
``tr`` and ``resumed`` add a ModelCheckpoint with a dirpath outside the run folder (``kept`` beside ``tr``'s runs).
Data: tiny synthetic CIFAR, 101 validation images (uneven shards: 50 and 51), 538 training images (269 per
rank, 9 batches of a 64 global batch, i.e. 32 per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runs import kept_checkpoints, small
from cutmix_pl.cli import CONFIG_DIR, main
from cutmix_pl.data import CIFAR10DataModule

pytestmark = pytest.mark.slow(seconds=10)

TESTS = Path(__file__).resolve().parents[1]  # the helpers (ddp_probe.py)
VAL_SIZE, TRAIN_SIZE, BATCH, WORLD = 101, 538, 64, 2
STEPS_PER_EPOCH = -(-(TRAIN_SIZE // WORLD) // (BATCH // WORLD))  # 269 per rank in batches of 32: 9


def cli_args(data_dir: Path, *extra: str) -> list[str]:
    return [*small(data_dir, data__val_size=VAL_SIZE, data__train_size=TRAIN_SIZE, data__batch_size=BATCH,
                   data__eval_batch_size=100, trainer__limit_val_batches=None, trainer__num_sanity_val_steps=0),
            "--config", str(CONFIG_DIR / "ddp.yaml"), *extra]


def ddp_args(data_dir: Path, *extra: str) -> list[str]:
    return cli_args(data_dir, "--trainer.devices", str(WORLD), "--trainer.strategy", "ddp",
                    "--trainer.callbacks+=ddp_probe.DDPProbe", "--trainer.callbacks.out", "probe", *extra)


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
             OMP_NUM_THREADS="1", CUTMIX_PL_TRACEBACK="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE", "JSM_NAMESPACE_RANK", "PL_GLOBAL_SEED", "SLURM_JOB_ID", "SLURM_NTASKS",
                "SLURM_PROCID"):
        e.pop(key, None)
    return e


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def fit(cwd: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "cutmix_pl", "fit", *ddp_args(data_dir, *extra)], cwd)


def probes(cwd: Path) -> list[dict]:
    out = [json.loads((cwd / "probe" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [p["rank"] for p in out] == list(range(WORLD)) and all(p["world_size"] == WORLD for p in out)
    return out


def batches(probe: dict, epoch: int) -> list[dict]:
    return [b for b in probe["batches"] if b["epoch"] == epoch]


def run_dir(cwd: Path) -> Path:
    versions = sorted((cwd / "runs" / "smoke").iterdir())
    assert [v.name for v in versions] == ["version_0"], versions  # one logger folder, not one per rank
    return versions[0]


@pytest.fixture(scope="module")
def ref(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("ddp_ref")
    fit(cwd, tiny_cifar, "--trainer.max_epochs", "2")
    return cwd


@pytest.fixture(scope="module")
def tr(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    cwd = tmp_path_factory.mktemp("ddp_torchrun")
    run([torchrun, "--standalone", "--nproc_per_node", str(WORLD), "-m", "cutmix_pl", "fit",
         *ddp_args(tiny_cifar, "--trainer.max_epochs", "1", *kept_checkpoints(cwd / "kept"))], cwd)
    return cwd


@pytest.fixture(scope="module")
def resumed(tr: Path, tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("ddp_resumed")
    ckpt = run_dir(tr) / "checkpoints" / "last.ckpt"
    fit(cwd, tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt), *kept_checkpoints(tr / "kept"))
    return cwd


@pytest.fixture(scope="module")
def train_split(tiny_cifar: Path):
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=VAL_SIZE, train_size=TRAIN_SIZE)
    return dm.split("train")


def test_shards_are_disjoint_complete_and_are_what_each_rank_trains_on(ref, train_split):
    p = probes(ref)
    for epoch in (0, 1):
        shards = [p[r]["shards"][str(epoch)] for r in range(WORLD)]
        assert all(s["sampler_epoch"] == epoch and s["split_size"] == TRAIN_SIZE for s in shards)
        idx = [s["indices"] for s in shards]
        assert [len(i) for i in idx] == [TRAIN_SIZE // WORLD] * WORLD
        assert not set(idx[0]) & set(idx[1]), "ranks share training images"
        assert sorted(idx[0] + idx[1]) == list(range(TRAIN_SIZE)), "the shards do not cover the epoch"
        for r in range(WORLD):  # each rank's batches are exactly its shard, in order, 32 images a step
            seen = [lab for b in batches(p[r], epoch) for lab in b["labels"]]
            assert seen == train_split.labels[torch.tensor(idx[r])].tolist()
            assert [len(b["labels"]) for b in batches(p[r], epoch)][:-1] == [BATCH // WORLD] * (STEPS_PER_EPOCH - 1)
    # a new permutation each epoch
    assert p[0]["shards"]["0"]["indices"] != p[0]["shards"]["1"]["indices"]


def test_augmentation_differs_across_ranks_and_repeats_for_the_same_seed(ref, tr):
    p_ref, p_tr = probes(ref), probes(tr)
    lam = [[b["lam"] for b in batches(p_ref[r], 0)] for r in range(WORLD)]
    assert lam[0] != lam[1], "both ranks drew the same CutMix stream"
    assert any(0 < x < 1 for b in lam[1] for x in b), "rank 1 never mixed"
    # Same seed, other launcher (torchrun), other run: the same shard and the same stream on every rank.
    for r in range(WORLD):
        assert p_tr[r]["shards"]["0"] == p_ref[r]["shards"]["0"]
        assert batches(p_tr[r], 0) == batches(p_ref[r], 0)


def test_validation_metrics_are_reduced_over_ranks(ref, tiny_cifar, in_tmp):
    p = probes(ref)
    last = [q["val_metrics"][-1] for q in p]
    assert len(p[0]["val_metrics"]) == 2
    assert last[0] == last[1], "ranks disagree on the synced validation metrics"
    # A single process (in this one) validating the saved weights on all 101 images must find the same numbers.
    ckpt = run_dir(ref) / "checkpoints" / "last.ckpt"
    main(["validate", *cli_args(tiny_cifar, "--trainer.devices", "1", "--trainer.strategy", "auto",
                                "--ckpt_path", str(ckpt), "--trainer.callbacks+=ddp_probe.DDPProbe",
                                "--trainer.callbacks.out", "probe")])
    one = json.loads((in_tmp / "probe" / "rank0.json").read_text())
    assert one["world_size"] == 1
    got = one["val_metrics"][-1]
    for key in ("val/acc", "val/acc_top5", "val/loss", "val/ece"):
        assert got[key] == pytest.approx(last[0][key], rel=1e-4, abs=1e-5), key
    assert round(got["val/acc"] * VAL_SIZE) == pytest.approx(got["val/acc"] * VAL_SIZE, abs=1e-3)


def test_rank_zero_alone_writes_one_set_of_files(ref):
    run = run_dir(ref)
    assert sorted(p.name for p in ref.iterdir()) == ["probe", "runs"]
    # the DDP fit's files (a `validate` of its checkpoint, in another test, writes into the run's validate/)
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
                   and not p.relative_to(run).parts[0] == "validate")
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert len(events) == 1, files
    ckpts = sorted(f for f in files if f.endswith(".ckpt"))
    assert "checkpoints/last.ckpt" in ckpts and len(ckpts) == 2, ckpts  # last + the single best
    assert sorted(set(files) - set(events) - set(ckpts)) == [".lock", "config.yaml", "hparams.yaml"]
    # Each global step is logged once (by rank 0), over both epochs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 2 * STEPS_PER_EPOCH
    assert len(acc.Scalars("val/acc")) == 2


def test_torchrun_launch_is_not_relaunched(tr):
    p = probes(tr)
    assert [q["env_rank"] for q in p] == ["0", "1"]  # ranks came from torchrun's environment
    assert all(q["global_step"] == STEPS_PER_EPOCH and q["current_epoch"] == 1 for q in p)
    run_dir(tr)  # one version folder
    assert (run_dir(tr) / "checkpoints" / "last.ckpt").is_file()


def test_resume_under_ddp_continues_exactly(resumed, ref):
    p_res, p_ref = probes(resumed), probes(ref)
    for r in range(WORLD):
        got = p_res[r]["batches"]
        assert {b["epoch"] for b in got} == {1}, "resumed run re-trained epoch 0"
        assert [b["global_step"] for b in got] == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
        assert p_res[r]["global_step"] == 2 * STEPS_PER_EPOCH and p_res[r]["current_epoch"] == 2
        # the same shard, labels, CutMix draws and global-stream draws as epoch 1 of the uninterrupted run, rank by
        # rank (each rank's global stream is its own: GlobalRNGState restores every rank's)
        assert p_res[r]["shards"]["1"] == p_ref[r]["shards"]["1"]
        assert got == batches(p_ref[r], 1), f"rank {r}'s epoch 1 after resume differs from the uninterrupted run"


def test_a_resume_under_ddp_writes_on_into_its_own_checkpoint_folder_outside_the_run(resumed, tr):
    """The run's explicit dirpath already holds its epoch-0 checkpoint: that is the resumed run's own folder, not an
    earlier run's, for both ranks (each checks)."""
    steps = STEPS_PER_EPOCH
    assert sorted(p.name for p in (tr / "kept").glob("*.ckpt")) == [f"epoch=0-step={steps}.ckpt",
                                                                    f"epoch=1-step={2 * steps}.ckpt"]


def test_resumed_training_means_under_ddp_are_the_uninterrupted_runs(resumed, tr, ref):
    """The checkpoint carries the means' sums gathered over both ranks; one saved at an epoch's end must not leak
    into the next epoch's means. (The resume went on in the torchrun run's folder.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def means(cwd: Path) -> list[float]:
        acc = EventAccumulator(str(run_dir(cwd)), size_guidance={"scalars": 0}).Reload()
        return [e.value for e in acc.Scalars("train/loss_epoch")]

    ckpt = torch.load(run_dir(tr) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["train_epoch_sums"]["sums"][1] == TRAIN_SIZE // WORLD * WORLD  # both ranks
    assert means(tr) == pytest.approx(means(ref), abs=1e-5)


def two_nodes(cwd: Path, data_dir: Path, *extra: str) -> None:
    """Lightning's own launcher on each of two one-process "nodes" (NODE_RANK, MASTER_ADDR, MASTER_PORT; no rank
    variable), on this machine, in one folder as nodes share a filesystem."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cutmix_pl", "fit",
           *ddp_args(data_dir, "--trainer.devices", "1", "--trainer.num_nodes", str(WORLD), *extra)]
    procs = [subprocess.Popen(cmd, cwd=cwd, env={**env(), "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                                                 "MASTER_PORT": str(port)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for node in (1, 0)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]


def test_two_nodes_started_by_lightnings_launcher_write_and_resume_one_run(tiny_cifar, tmp_path):
    # node 1's first process has no rank variable: taken for rank 0, it claimed a second, empty version folder
    # (run_dir: one folder), and on a resume it took the run folder's lock too, refused as "in use"
    two_nodes(tmp_path, tiny_cifar, "--trainer.max_epochs", "1")
    assert [q["global_step"] for q in probes(tmp_path)] == [STEPS_PER_EPOCH] * WORLD
    assert (run_dir(tmp_path) / "checkpoints" / "last.ckpt").is_file()
    two_nodes(tmp_path, tiny_cifar, "--trainer.max_epochs", "2", "--ckpt_path", "runs/smoke/version_0")
    assert [q["global_step"] for q in probes(tmp_path)] == [2 * STEPS_PER_EPOCH] * WORLD
    last = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("setting,message", [
    (("--data.batch_size", "63"), "data.batch_size=63 is the global batch and must be divisible by the 2 processes"),
    # one validation image for two ranks: Lightning's own error would be a traceback on the empty rank
    (("--data.val_size", "1"), "data.val_size=1 gives 2 processes fewer than one validation image each"),
])
def test_a_setting_the_processes_cannot_share_is_one_line_before_training(tiny_cifar, tmp_path, setting, message):
    proc = subprocess.run([sys.executable, "-m", "cutmix_pl", "fit", *ddp_args(tiny_cifar, *setting)],
                          cwd=tmp_path, env={**env(), "CUTMIX_PL_TRACEBACK": ""}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cutmix-pl: error: {message}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "probe").exists(), "it trained first"
    assert not list(tmp_path.iterdir()), "it left a run folder behind"  # the README's promise for bad input


@pytest.mark.slow(seconds=20)
def test_a_rank_whose_peer_is_gone_ends_in_one_line_not_a_traceback(tiny_cifar, tmp_path):
    """Low: rank 1 waiting on rank 0 (connecting, here) when rank 0 stops printed a 54-line traceback. Rank 0 is
    played by the test: a store that rank 1 joins, then closed."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, WORLD, True, wait_for_workers=False)
    rank1 = {**env(), "CUTMIX_PL_TRACEBACK": "", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": str(WORLD)}
    proc = subprocess.Popen([sys.executable, "-m", "cutmix_pl", "fit", *ddp_args(tiny_cifar)], cwd=tmp_path,
                            env=rank1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while store.num_keys() < 2 and proc.poll() is None and time.monotonic() < deadline:  # rank 1 has joined
        time.sleep(0.1)
    time.sleep(1)
    del store  # rank 0 gone
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("cutmix-pl: error: the DDP processes could not connect or lost "
                                                   "each other (DistNetworkError: "), err[-3000:]
