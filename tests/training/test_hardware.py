"""The settings chosen for the machine when trainer.precision / model.channels_last are left null."""

import pytest
import torch
import yaml

from cutmix_pl import hardware
from cutmix_pl.cli import main
from cutmix_pl.runs.rules import changed_settings

from cli_runs import small

EPYC = frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})  # the AVX2-only EPYC of the bf16 warning: no bf16 instructions
ARM = frozenset({"fp", "asimd"})


@pytest.mark.parametrize(("accelerator", "cuda", "flags", "precision", "channels_last"), [
    ("auto", True, frozenset(), "bf16-mixed", True),        # a GPU, whatever the CPU
    ("gpu", True, EPYC, "bf16-mixed", True),
    ("cpu", True, frozenset({"avx2"}), "32-true", True),   # asked for the CPU where a GPU is present
    ("auto", False, EPYC, "32-true", True),                # the AVX-512 EPYC CPU of docs/speed.md: bf16 lost accuracy there
    ("cpu", False, frozenset({"amx_bf16", "avx512f"}), "32-true", True),
    ("cpu", False, frozenset({"avx512f"}), "32-true", True),
    ("cpu", False, frozenset({"avx2", "fma"}), "32-true", True),  # AVX2 only: channels-last measured faster
    ("auto", False, AVX2, "32-true", True),
    ("cpu", False, frozenset({"sse2", "avx"}), "32-true", False),  # x86 without AVX2: not measured
    ("cpu", False, ARM, "32-true", False),                  # not measured
    ("cpu", False, frozenset(), "32-true", False),          # no /proc/cpuinfo (macOS, Windows)
    ("mps", False, EPYC, "32-true", False),                 # not a CPU, not measured
])
def test_choice_follows_the_measured_rule(accelerator, cuda, flags, precision, channels_last):
    choice = hardware.choose(accelerator, cuda_available=cuda, flags=flags)
    assert (choice.precision, choice.channels_last) == (precision, channels_last)


def test_choice_says_why():
    assert "AVX-512" in hardware.choose("cpu", cuda_available=False, flags=EPYC).why
    assert "AVX2 and no AVX-512: channels-last 1.17x NCHW" in hardware.choose("cpu", cuda_available=False,
                                                                              flags=AVX2).why
    assert "not measured" in hardware.choose("cpu", cuda_available=False, flags=ARM).why
    assert "not measured" in hardware.choose("cpu", cuda_available=False, flags=frozenset()).why


def test_bf16_is_named_only_where_the_cpu_has_it():
    assert "bf16-mixed" in hardware.choose("cpu", cuda_available=False, flags=EPYC).hint
    assert hardware.choose("cpu", cuda_available=False, flags=frozenset({"avx512f"})).hint == ""
    assert hardware.choose("cpu", cuda_available=False, flags=AVX2).hint == ""
    assert hardware.choose("gpu", cuda_available=True, flags=EPYC).hint == ""


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16", "bf16-true"])
@pytest.mark.parametrize(("accelerator", "cuda"), [("cpu", False), ("auto", False), ("cpu", True)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(precision, accelerator, cuda):
    for flags in (AVX2, frozenset({"sse2", "avx2", "avx512f"})):  # AVX-512 without its bf16 instructions too
        warning = hardware.bf16_warning(precision, accelerator, cuda_available=cuda, flags=flags)
        assert warning.startswith(f"trainer.precision={precision} on a CPU without bf16 instructions")
        assert "about 15x slower than fp32 (31 against 465 img/s" in warning and "limited to AVX2" in warning
        assert "fix: --trainer.precision 32-true, or leave it null" in warning and "\n" not in warning


@pytest.mark.parametrize(("precision", "accelerator", "cuda", "flags"), [
    ("bf16-mixed", "cpu", False, EPYC),                       # native bf16
    ("bf16-mixed", "cpu", False, frozenset({"sse2", "avx2", "amx_bf16"})),
    ("bf16-mixed", "auto", True, AVX2),                       # a GPU run
    ("bf16-mixed", "gpu", True, AVX2),
    ("bf16-mixed", "mps", False, AVX2),                       # not a CPU run
    ("bf16-mixed", "cpu", False, ARM),                        # not measured: ARM, no /proc/cpuinfo
    ("bf16-mixed", "cpu", False, frozenset()),
    ("32-true", "cpu", False, AVX2),                          # not bf16
    ("16-mixed", "cpu", False, AVX2),
    (None, "cpu", False, AVX2),
])
def test_no_bf16_warning_elsewhere(precision, accelerator, cuda, flags):
    assert hardware.bf16_warning(precision, accelerator, cuda_available=cuda, flags=flags) is None


def test_cpu_flags_read_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert hardware.cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert hardware.cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert hardware.cpu_flags(tmp_path / "missing") == frozenset()


def run_config(data_dir, *extra):
    cli = main(["fit", *small(data_dir), "--trainer.max_steps", "1", *extra])
    with open(f"{cli.trainer.log_dir}/config.yaml") as f:
        return cli, yaml.safe_load(f)


def test_null_settings_are_chosen_printed_and_recorded(tiny_cifar, in_tmp, capsys):
    cli, config = run_config(tiny_cifar)
    choice = hardware.choose("cpu")
    assert config["trainer"]["precision"] == choice.precision == cli.trainer.precision
    assert config["model"]["channels_last"] is choice.channels_last is cli.model.hparams.channels_last
    assert f"trainer.precision={choice.precision}" in capsys.readouterr().err
    conv = cli.model.net.stages[0][0].conv1.weight  # [4, 4, 3, 3]: only one memory format fits it
    assert conv.is_contiguous(memory_format=torch.channels_last) is choice.channels_last


def test_set_values_are_kept(tiny_cifar, in_tmp, capsys):
    cli, config = run_config(tiny_cifar, "--trainer.precision", "32-true", "--model.channels_last", "false")
    assert config["trainer"]["precision"] == "32-true" and config["model"]["channels_last"] is False
    assert "trainer.precision=" not in capsys.readouterr().err


def test_a_resume_keeps_what_the_run_chose(tiny_cifar, in_tmp, capsys):
    """Left null, precision and memory format follow the run being resumed, not this machine's choice: a run started
    in fp32 NCHW (by an earlier version, another machine or its flags) continues so."""
    cli, _ = run_config(tiny_cifar, "--trainer.precision", "32-true", "--model.channels_last", "false",
                        "--trainer.max_epochs", "1", "--trainer.max_steps", "-1", "--trainer.limit_train_batches", "2")
    run = cli.trainer.log_dir
    capsys.readouterr()
    again, _ = run_config(tiny_cifar, "--ckpt_path", run, "--trainer.max_epochs", "2", "--trainer.max_steps", "-1",
                          "--trainer.limit_train_batches", "2")
    assert again.trainer.log_dir == run and again.trainer.current_epoch == 2
    with open(f"{run}/config.resume1.yaml") as f:
        resumed = yaml.safe_load(f)
    assert resumed["trainer"]["precision"] == "32-true" and resumed["model"]["channels_last"] is False
    assert again.trainer.precision == "32-true" and "trainer.precision=" not in capsys.readouterr().err


def test_null_precision_matches_the_precision_a_run_chose():
    """So that --ckpt_path last finds a run whatever precision this machine would pick; a set value must match."""
    saved = {"trainer": {"precision": "32-true"}, "data": {"batch_size": 128}}
    assert changed_settings(saved, {"trainer": {"precision": None}, "data": {"batch_size": 128}}) == []
    assert changed_settings(saved, {"trainer": {"precision": "bf16-mixed"}, "data": {"batch_size": 128}}) == [
        ("trainer.precision", "32-true", "bf16-mixed")]


def test_the_training_precision_hint_is_for_fit_only(tiny_cifar, in_tmp, capsys, monkeypatch):
    # as on a CPU with bf16 instructions, whatever this one has
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: EPYC)
    cli, _ = run_config(tiny_cifar)
    assert "trains about 2x faster" in capsys.readouterr().err
    main(["test", *small(tiny_cifar), "--ckpt_path", cli.trainer.log_dir])
    err = capsys.readouterr().err
    assert "trainer.precision=32-true" in err and "trains about 2x faster" not in err


def test_bf16_asked_on_a_cpu_that_emulates_it_is_warned_once(tiny_cifar, in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: AVX2)  # as on an AVX2-only CPU
    cli, config = run_config(tiny_cifar, "--trainer.precision", "bf16-mixed")
    err = capsys.readouterr().err
    line = "cutmix-pl: trainer.precision=bf16-mixed on a CPU without bf16 instructions"
    assert err.count(line) == 1 and "fix: --trainer.precision 32-true" in err
    assert config["trainer"]["precision"] == "bf16-mixed" == cli.trainer.precision  # taken, as asked
    assert config["model"]["channels_last"] is True  # the AVX2 choice for the setting left null
    run_config(tiny_cifar, "--trainer.precision", "32-true")
    assert "without bf16 instructions" not in capsys.readouterr().err


def test_no_bf16_warning_where_the_cpu_has_bf16_instructions(tiny_cifar, in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: EPYC)
    run_config(tiny_cifar, "--trainer.precision", "bf16-mixed")
    assert "without bf16 instructions" not in capsys.readouterr().err
