"""The Lightning CLI end to end on tiny synthetic data: fit, validate, test, predict, configs, TensorBoard."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from cutmix_pl import runs
from cutmix_pl.cli import CONFIG_DIR, main
from cutmix_pl.module import ImageClassifier

TINY = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "2",
        "--trainer.limit_train_batches", "null", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--data.batch_size", "64", "--data.eval_batch_size", "100",
        "--data.val_size", "100", "--data.download", "false"]


def fit(data_dir, *extra):
    return main(["fit", "--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(data_dir), *TINY,
                 *extra])


def test_fit_writes_events_checkpoints_and_config(tiny_cifar, in_tmp):
    cli = fit(tiny_cifar)
    run = Path(cli.trainer.log_dir).resolve()
    assert run.parent == in_tmp.resolve() / "runs" / "smoke"
    assert (run / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(p.startswith("best-") for p in ckpts)
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_epoch", "train/lr", "train/acc_dominant", "val/loss", "val/acc",
            "val/acc_top5", "val/ece", "hp_metric", "val_class/cat"} <= scalars
    assert {"train/mixed_images", "val/confusion_matrix"} <= set(acc.Tags()["images"])
    assert len(acc.Images("train/mixed_images")) == 2  # once per epoch
    assert len(acc.Scalars("train/loss")) == cli.trainer.global_step  # per step (log_every_n_steps 1)
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < lrs[len(lrs) // 2]  # warm-up then cosine decay, per step
    hparams = acc.PluginTagToContent("hparams")  # raises KeyError when no hparams were written
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info.hparams
    shown = {k: v.string_value or v.number_value or v.bool_value for k, v in start.items()}
    # the HPARAMS tab: model (the network and the optimiser as configured), data, the mixer (smoke.yaml over cutmix.yaml)
    assert shown["net/class_path"] == "cutmix_pl.resnet.ResNet" and shown["net/init_args/depth"] == 20
    assert shown["net/init_args/num_classes"] == 10 and shown["batch_size"] == cli.datamodule.batch_size
    assert shown["mixer"].startswith("CutMix(alpha=1.0, prob=0.5")
    assert shown["optimizer/class_path"] == "torch.optim.SGD" and shown["optimizer/init_args/lr"] == pytest.approx(0.1)
    assert shown["optimizer/init_args/weight_decay"] == pytest.approx(5e-4, rel=1e-6)
    assert shown["optimizer/init_args/nesterov"] == 1
    # The logged hparams.yaml loads back with a checkpoint (its data keys name no __init__ argument), into the same
    # network and optimiser.
    model = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", hparams_file=run / "hparams.yaml")
    assert model.hparams.net["init_args"]["depth"] == 20 and len(model.net.stages[0]) == 3
    assert model.optimizer_factory(model.parameters()).defaults["weight_decay"] == pytest.approx(5e-4)
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_validate_and_test_a_checkpoint(tiny_cifar, in_tmp, capsys):
    cli = fit(tiny_cifar, "--trainer.max_epochs", "4")
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    common = ["--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(tiny_cifar), *TINY,
              "--ckpt_path", str(ckpt)]
    val = main(["validate", *common])
    assert 0.0 <= float(val.trainer.callback_metrics["val/acc"]) <= 1.0
    test = main(["test", *common, "--trainer.limit_test_batches", "null"])
    acc = float(test.trainer.callback_metrics["test/acc"])
    assert acc > 0.3, f"four epochs on separable colours should beat chance (0.1); got {acc}"
    out = capsys.readouterr().out
    assert "test/acc" in out and "val/acc" in out
    events = EventAccumulator(test.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
    assert events.Scalars("test/acc")[-1].value == pytest.approx(acc)
    assert test.model.hparams.tta_flip is False
    tta = main(["test", *common, "--trainer.limit_test_batches", "null", "--model.tta_flip", "true"])
    assert tta.model.hparams.tta_flip is True, "the command's --model.tta_flip must win over the checkpoint's"
    assert float(tta.trainer.callback_metrics["test/acc"]) > 0.3
    # predict runs on the test set: its predictions recount the test accuracy through another code path
    pred = main(["predict", *common, "--trainer.limit_predict_batches", "null"])
    batches = pred.trainer.predict_loop.predictions
    probs = torch.cat([b["prob"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert probs.shape == (len(pred.datamodule.split("test").labels), 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    assert (probs.argmax(-1) == labels).float().mean().item() == pytest.approx(acc, abs=1e-6)


def test_no_mixing_mixup_and_randaugment_configs_train(tiny_cifar, in_tmp):
    for cfg, mixer in (("baseline.yaml", "none"), ("mixup.yaml", "MixUp(alpha=1.0"), ("randaugment.yaml", "CutMix(")):
        cli = main(["fit", "--config", str(CONFIG_DIR / cfg), "--config", str(CONFIG_DIR / "smoke.yaml"),
                    "--data.data_dir", str(tiny_cifar), *TINY, "--trainer.max_epochs", "1"])
        assert cli.trainer.state.finished and cli.trainer.global_step == cli.trainer.num_training_batches
        saved = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
        chosen = saved["datamodule_hyper_parameters"]
        assert chosen["mixer"].startswith(mixer)  # the config chose the mixing
        assert chosen["randaugment"].startswith("RandAugment(num_ops=2, magnitude=9" if "rand" in cfg else "none")
        events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
        assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))


def test_a_limit_of_one_is_named_as_all_batches(tiny_cifar, in_tmp, capsys):
    # a float is a fraction to Lightning, and the CLI reads Trainer's int-or-float limits as floats
    cli = fit(tiny_cifar, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
              "--data.eval_batch_size", "50", "--model.log_images", "false")
    assert "trainer.limit_val_batches=1 reads as 1.0, all batches" in capsys.readouterr().err
    assert cli.trainer.num_val_batches == [2]  # 100 validation images in batches of 50


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_true_precisions_train_and_evaluate(precision, dtype, tiny_cifar, in_tmp):
    """Lightning converts a batch to a true precision before the DataModule's hook, when it is still uint8: the
    images the hook makes must reach the network in its dtype, in training and in evaluation."""
    flags = ["--trainer.precision", precision, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
             "--model.net.depth", "8", "--model.net.width", "4", "--model.log_images", "false"]
    cli = fit(tiny_cifar, *flags)
    assert cli.trainer.state.finished and next(cli.model.parameters()).dtype == dtype
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))
    ckpt = str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")
    test = main(["test", "--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(tiny_cifar), *TINY,
                 *flags, "--ckpt_path", ckpt])
    assert 0.0 <= float(test.trainer.callback_metrics["test/acc"]) <= 1.0


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_print_config_for_every_config(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIG_DIR / config), "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    resolved = runs.flatten(yaml.safe_load(out))
    stated = runs.flatten(yaml.safe_load((CONFIG_DIR / config).read_text()))
    # every value the file states is in the resolved config (other keys of a swapped class aside)
    assert {k: v for k, v in stated.items() if k in resolved} == {k: resolved[k] for k in stated if k in resolved}
    assert [k for k in stated if k not in resolved and ".init_args." not in k and "callbacks" not in k] == []
    assert {"model.net.class_path", "data.batch_size", "trainer.max_epochs"} <= set(resolved)
    if config == "cutmix.yaml":
        return
    # an overlay states only what differs from the recipe: each value it sets changes the resolved config
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    recipe = runs.flatten(yaml.safe_load(capsys.readouterr().out))
    swapped = [k[: -len("class_path")] for k in stated if k.endswith("class_path") and recipe.get(k) != stated[k]]
    same = [k for k in stated if k in recipe and recipe[k] == resolved[k] and not k.startswith(tuple(swapped))]
    assert not same, f"{config} repeats the recipe's values: {same}"


def test_num_classes_is_linked_from_data(tiny_cifar, in_tmp):
    cli = fit(tiny_cifar, "--trainer.max_epochs", "1")
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10


def test_bad_value_gives_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model.net.depth", "21", "--trainer.accelerator", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cutmix-pl: error:") and "6n+2" in err[-1]


def test_console_script_exits_zero_after_a_run(tiny_cifar, in_tmp):
    """`cutmix-pl` (pyproject's console script) is `python -m cutmix_pl`: a finished run exits with status 0."""
    script = Path(sys.executable).parent / "cutmix-pl"
    assert script.is_file(), "install the package (pip install -e .) to get the cutmix-pl command"
    done = subprocess.run([str(script), "fit", "--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir",
                           str(tiny_cifar), *TINY, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((in_tmp / "runs" / "smoke").glob("version_0/checkpoints/last.ckpt"))


def test_output_is_quiet_and_the_summary_counts_flops(tiny_cifar, in_tmp):
    # a subprocess: Lightning's log handler holds the stderr of the process that imported it first
    args = ["fit", "--config", str(CONFIG_DIR / "smoke.yaml"), "--data.data_dir", str(tiny_cifar), *TINY,
            "--trainer.max_epochs", "1", "--trainer.enable_model_summary", "true"]
    done = subprocess.run([sys.executable, "-m", "cutmix_pl", *args], cwd=in_tmp, capture_output=True, text=True,
                          timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "litlogger" not in text and "LeafSpec" not in text and "weights_only" not in text
    total = next(line for line in text.splitlines() if line.rstrip().endswith("Total Flops"))
    assert total.split()[:2] == ["81.1", "M"], total  # ResNet-20, one 32x32 image: about 41 M multiply-adds


def test_code_defaults_are_the_recipe():
    """One recipe: the constructors' defaults are configs/cutmix.yaml's values, so Python and the CLI train alike."""
    import inspect

    from cutmix_pl.data import CIFAR10DataModule
    from cutmix_pl.nets import build

    recipe = yaml.safe_load((CONFIG_DIR / "cutmix.yaml").read_text())
    model, data = recipe["model"], recipe["data"]
    built = ImageClassifier()
    net = build(model["net"])
    assert type(built.net) is type(net) and built.net.init_args == net.init_args
    sgd = build({**model["optimizer"], "init_args": {"params": [torch.zeros(1)], **model["optimizer"]["init_args"]}})
    assert built.optimizer_factory([torch.zeros(1)]).defaults == sgd.defaults
    for cls, section in ((ImageClassifier, model), (CIFAR10DataModule, data)):
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        plain = {k: v for k, v in section.items() if not isinstance(v, dict)}
        assert plain == {k: defaults[k] for k in plain}, cls.__name__
    mixer = CIFAR10DataModule().mixer
    assert f"{type(mixer).__module__}.{type(mixer).__name__}" == data["mixer"]["class_path"]
    assert all(getattr(mixer, k) == v for k, v in data["mixer"]["init_args"].items())


@pytest.mark.slow
def test_fit_with_a_compiled_transform(tiny_cifar, in_tmp):
    """data.compile_transform through the CLI: its hparam sits beside model.compile (Lightning merges the two sets of
    hparams and refuses a shared key with different values), and training runs through the compiled transform."""
    cli = fit(tiny_cifar, "--data.compile_transform", "true", "--trainer.max_epochs", "1", "--model.log_images", "false")
    assert cli.datamodule.transform._compiled is not None  # the compiled function made the batches
    assert cli.datamodule.hparams.compile_transform is True and cli.model.hparams.compile is False
    assert cli.trainer.global_step > 0 and torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


def test_step_values_are_logged_on_the_steps_lightning_writes(tiny_cifar, in_tmp):
    """train/loss and train/lr are logged only on the steps Lightning writes (every log_every_n_steps-th): none of
    those is missed, and the epoch means still cover every step."""
    cli = fit(tiny_cifar, "--trainer.log_every_n_steps", "3", "--model.log_images", "false")
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
    steps = cli.trainer.global_step
    assert steps >= 6
    for tag in ("train/loss", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [s for s in range(steps) if (s + 1) % 3 == 0], tag
    assert len(acc.Scalars("train/loss_epoch")) == len(acc.Scalars("train/acc_dominant")) == cli.trainer.max_epochs


def test_drop_last_trains_the_same_steps_minus_the_ragged_batch(tiny_cifar, in_tmp):
    """The static-shape setting (data.drop_last) changes nothing but the dropped batch: with a constant learning rate
    the loss of every step it keeps equals today's, bit for bit."""
    flags = ["--trainer.max_epochs", "1", "--model.lr_schedule", "constant", "--model.warmup_epochs", "0",
             "--model.log_images", "false", "--trainer.precision", "32-true"]
    losses = []
    for drop in ("false", "true"):
        cli = fit(tiny_cifar, *flags, "--data.drop_last", drop)
        acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
        losses.append([e.value for e in acc.Scalars("train/loss")])
    today, static = losses
    assert len(today) == 9 and len(static) == 8  # 540 training images in batches of 64: the 28-image batch dropped
    assert static == today[:8]
