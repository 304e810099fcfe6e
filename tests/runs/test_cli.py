"""The Lightning CLI end to end on tiny synthetic data: fit, validate, test, predict, configs, TensorBoard."""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.model_summary import ModelSummary
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from cli_runs import small
from cutmix_pl.runs import rules
from cutmix_pl.cli import CONFIG_DIR, main
from cutmix_pl.module import ImageClassifier
from cutmix_pl.schedules import lr_factor

# The shared fit: all 540 training images (640 - 100 held out) in batches of 32, i.e. 17 steps an epoch (the last
# of 28 images), two epochs, a value logged every 3rd step, validation on 100 images in batches of 50.
EPOCHS, STEPS, LOG_EVERY = 2, 17, 3


def scalars(log_dir, tag):
    return EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload().Scalars(tag)


@pytest.fixture(scope="module")
def trained(tiny_cifar, tmp_path_factory):
    """One fit that several tests read: (its working folder, the CLI, what it wrote on stderr)."""
    cwd, err = tmp_path_factory.mktemp("fit"), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stderr(err):
        cli = main(["fit", *small(tiny_cifar, data__train_size=None, data__val_size=100, data__batch_size=32,
                                  trainer__max_epochs=EPOCHS, trainer__log_every_n_steps=LOG_EVERY,
                                  trainer__limit_val_batches=1, model__log_images=True)])
    return cwd, cli, err.getvalue()


def test_fit_writes_events_checkpoints_and_config(trained):
    cwd, cli, _ = trained
    run = Path(cli.trainer.log_dir).resolve()
    assert run == cwd.resolve() / "runs" / "smoke" / "version_0"
    assert cli.trainer.global_step == EPOCHS * STEPS
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"] == 32
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(p.startswith("best-") for p in ckpts)
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"train/loss", "train/loss_epoch", "train/lr", "train/acc_dominant", "val/loss", "val/acc",
            "val/acc_top5", "val/ece", "hp_metric", "val_class/cat"} <= set(acc.Tags()["scalars"])
    assert {"train/mixed_images", "val/confusion_matrix"} <= set(acc.Tags()["images"])
    assert len(acc.Images("train/mixed_images")) == EPOCHS  # once per epoch
    # train/loss and train/lr only on the steps Lightning writes (every log_every_n_steps-th), none of them missed;
    # the epoch means still cover every step
    logged = [s for s in range(EPOCHS * STEPS) if (s + 1) % LOG_EVERY == 0]
    for tag in ("train/loss", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == logged, tag
    assert len(acc.Scalars("train/loss_epoch")) == len(acc.Scalars("train/acc_dominant")) == EPOCHS
    # warm-up for one epoch, then the cosine decay, per step (the recipe's lr 0.1)
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs == pytest.approx([0.1 * lr_factor(s, EPOCHS * STEPS, STEPS, "cosine") for s in logged])
    hparams = acc.PluginTagToContent("hparams")  # raises KeyError when no hparams were written
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info.hparams
    shown = {k: v.string_value or v.number_value or v.bool_value for k, v in start.items()}
    # the HPARAMS tab: model (the network and the optimiser as configured), data, the mixer (smoke.yaml over cutmix.yaml)
    assert shown["net/class_path"] == "cutmix_pl.resnet.ResNet" and shown["net/init_args/depth"] == 8
    assert shown["net/init_args/num_classes"] == 10 and shown["batch_size"] == 32
    assert shown["mixer"].startswith("CutMix(alpha=1.0, prob=0.5")
    assert shown["optimizer/class_path"] == "torch.optim.SGD" and shown["optimizer/init_args/lr"] == pytest.approx(0.1)
    assert shown["optimizer/init_args/weight_decay"] == pytest.approx(5e-4, rel=1e-6)
    assert shown["optimizer/init_args/nesterov"] == 1
    # The logged hparams.yaml loads back with a checkpoint (its data keys name no __init__ argument), into the same
    # network and optimiser.
    model = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", hparams_file=run / "hparams.yaml")
    assert model.hparams.net["init_args"]["depth"] == 8 and len(model.net.stages[0]) == 1
    assert model.optimizer_factory(model.parameters()).defaults["weight_decay"] == pytest.approx(5e-4)
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_num_classes_is_linked_from_data(trained, capsys):
    _, cli, _ = trained
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10 == cli.model.net.fc.out_features
    # the link, not the defaults' agreement: the model's own flag is gone, its value comes from the data
    capsys.readouterr()
    with pytest.raises(SystemExit) as failed:
        main(["fit", "--model.num_classes", "7", "--print_config"])
    assert failed.value.code != 0 and 'Linked "model.num_classes" must be given via "data.num_classes"' in (
        capsys.readouterr().err)


def test_a_limit_of_one_is_named_as_all_batches(trained):
    # a float is a fraction to Lightning, and the CLI reads Trainer's int-or-float limits as floats
    _, cli, err = trained
    assert "trainer.limit_val_batches=1 reads as 1.0, all batches" in err
    assert cli.trainer.num_val_batches == [2]  # 100 validation images in batches of 50


def test_validate_test_and_predict_a_checkpoint(trained, tiny_cifar, in_tmp, capsys):
    _, fitted, _ = trained
    common = [*small(tiny_cifar, data__val_size=100, trainer__limit_test_batches=None,
                     trainer__limit_predict_batches=None),
              "--ckpt_path", str(Path(fitted.trainer.log_dir) / "checkpoints" / "last.ckpt")]
    val = main(["validate", *common])
    # last.ckpt holds the weights of the fit's last validation, on the same 100 images
    for key in ("val/acc", "val/loss"):
        assert float(val.trainer.callback_metrics[key]) == pytest.approx(float(fitted.trainer.callback_metrics[key]),
                                                                         abs=1e-6), key
    test = main(["test", *common])
    acc = float(test.trainer.callback_metrics["test/acc"])
    assert acc > 0.3, f"two epochs on separable colours should beat chance (0.1); got {acc}"
    out = capsys.readouterr().out
    assert "test/acc" in out and "val/acc" in out  # each command prints its results
    assert scalars(test.trainer.log_dir, "test/acc")[-1].value == pytest.approx(acc)
    assert test.model.hparams.tta_flip is False
    # testing never splits the training set: the default val_size, above these 640 images, does not stop it
    assert float(main(["test", *common, "--data.val_size", "5000"]).trainer.callback_metrics["test/acc"]) == acc
    tta = main(["test", *common, "--model.tta_flip", "true"])
    assert tta.model.hparams.tta_flip is True, "the command's --model.tta_flip must win over the checkpoint's"
    assert float(tta.trainer.callback_metrics["test/acc"]) > 0.3
    # predict runs on the test set: its predictions recount the test accuracy through another code path
    pred = main(["predict", *common])
    batches = pred.trainer.predict_loop.predictions
    probs = torch.cat([b["prob"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert probs.shape == (len(pred.datamodule.split("test").labels), 10) == (200, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    assert (probs.argmax(-1) == labels).float().mean().item() == pytest.approx(acc, abs=1e-6)


def test_a_fast_dev_run_writes_and_claims_nothing(trained, tiny_cifar, in_tmp, capsys):
    # Lightning's debug mode logs and saves nothing, so no run folder is claimed, left behind or reported
    run = Path(trained[1].trainer.log_dir).resolve()
    before = sorted(run.rglob("*"))
    for sub, extra in (("fit", []), ("test", ["--ckpt_path", str(run)])):
        capsys.readouterr()
        main([sub, *small(tiny_cifar, trainer__fast_dev_run=2), *extra])
        err = capsys.readouterr().err
        assert "cutmix-pl: run " not in err and " wrote " not in err
        assert not (in_tmp / "runs").exists() and sorted(run.rglob("*")) == before


def test_a_mixer_class_changed_by_name_names_the_values_it_keeps(tiny_cifar, in_tmp, capsys):
    # jsonargparse keeps the arguments two classes share: MixUp would run with CutMix's alpha and prob unannounced
    cases = ((["--data.mixer", "MixUp"], "data.mixer MixUp runs with alpha=1.0, prob=0.5 from the config before"),
             (["--data.mixer=MixUp", "--data.mixer.init_args.alpha", "0.4"], "data.mixer MixUp runs with prob=0.5 "),
             (["--config", "mixup"], None), (["--data.mixer", "null"], None))
    for flags, note in cases:
        capsys.readouterr()
        main(["fit", *small(tiny_cifar, trainer__fast_dev_run=1), *flags])
        err = capsys.readouterr().err
        assert (note in err and "own defaults are" in err) if note else "data.mixer" not in err


def test_no_mixing_mixup_and_randaugment_configs_train(tiny_cifar, in_tmp):
    for cfg, mixer in (("baseline.yaml", "none"), ("mixup.yaml", "MixUp(alpha=1.0"), ("randaugment.yaml", "CutMix(")):
        args = small(tiny_cifar, trainer__max_epochs=1, trainer__limit_train_batches=2)
        cli = main(["fit", "--config", str(CONFIG_DIR / cfg), *args])
        assert cli.trainer.global_step == 2
        saved = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
        chosen = saved["datamodule_hyper_parameters"]
        assert chosen["mixer"].startswith(mixer)  # the config chose the mixing
        assert chosen["randaugment"].startswith("RandAugment(num_ops=2, magnitude=9" if "rand" in cfg else "none")
        assert all(torch.isfinite(torch.tensor(e.value)) for e in scalars(cli.trainer.log_dir, "train/loss"))


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_true_precisions_train_and_evaluate(precision, dtype, tiny_cifar, in_tmp):
    """Lightning converts a batch to a true precision before the DataModule's hook, when it is still uint8: the
    images the hook makes must reach the network in its dtype, in training and in evaluation."""
    flags = small(tiny_cifar, trainer__precision=precision, trainer__max_epochs=1, trainer__limit_train_batches=3,
                  trainer__limit_test_batches=None)
    cli = main(["fit", *flags])
    assert cli.trainer.global_step == 3 and next(cli.model.parameters()).dtype == dtype
    assert all(torch.isfinite(torch.tensor(e.value)) for e in scalars(cli.trainer.log_dir, "train/loss"))
    test = main(["test", *flags, "--ckpt_path", str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")])
    # the same weights applied by hand, in the precision's dtype, to the 200 normalised test images
    split, model = test.datamodule.split("test"), test.model.eval()
    with torch.no_grad():
        logits = model(test.datamodule.transform.normalize(split.images).to(dtype))
    assert logits.dtype == dtype
    expected = (logits.argmax(-1) == split.labels).float().mean().item()
    assert float(test.trainer.callback_metrics["test/acc"]) == pytest.approx(expected, abs=0.011)  # 2 images


@pytest.fixture(scope="module")
def recipe():
    """The resolved default recipe, flattened (what `fit --print_config` prints with no --config)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    return rules.flatten(yaml.safe_load(out.getvalue()))


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_print_config_for_every_config(config, recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIG_DIR / config), "--print_config"])
    assert exit_.value.code in (0, None)
    resolved = rules.flatten(yaml.safe_load(capsys.readouterr().out))
    stated = rules.flatten(yaml.safe_load((CONFIG_DIR / config).read_text()))
    # every value the file states is in the resolved config (other keys of a swapped class aside)
    assert {k: v for k, v in stated.items() if k in resolved} == {k: resolved[k] for k in stated if k in resolved}
    assert [k for k in stated if k not in resolved and ".init_args." not in k and "callbacks" not in k] == []
    assert {"model.net.class_path", "data.batch_size", "trainer.max_epochs"} <= set(resolved)
    if config == "cutmix.yaml":
        return
    # an overlay states only what differs from the recipe: each value it sets changes the resolved config
    swapped = [k[: -len("class_path")] for k in stated if k.endswith("class_path") and recipe.get(k) != stated[k]]
    same = [k for k in stated if k in recipe and recipe[k] == resolved[k] and not k.startswith(tuple(swapped))]
    assert not same, f"{config} repeats the recipe's values: {same}"


def test_bad_value_gives_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model.net.depth", "21", "--trainer.accelerator", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cutmix-pl: error:") and "6n+2" in err[-1]


def test_help_cuts_the_list_of_every_nn_module_but_keeps_short_lists_whole(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    net = text.partition("--model.net NET the network")[2].partition("--model.optimizer")[0]
    listed = net.partition("known subclasses: ")[2]
    assert "cutmix_pl.ResNet" in listed and "torch.nn.Module" in listed
    assert len(listed.split(", ")) < 15 and re.search(r" and \d{3,} more: any importable class", listed), listed
    callbacks = text.partition("--trainer.callbacks CALLBACKS, --trainer.callbacks+ CALLBACKS")[2].partition(" --trainer.")[0]
    assert "lightning.pytorch.callbacks.EarlyStopping" in callbacks and "cutmix_pl.runs.stop.StopOnSignal" in callbacks
    assert " more: " not in callbacks


def test_console_script_trains_quietly_and_exits_zero(tiny_cifar, in_tmp):
    """`cutmix-pl` (pyproject's console script) is `python -m cutmix_pl`: a finished run exits with status 0, and
    third-party noise stays off the terminal (a subprocess: Lightning's log handler holds the stderr of the process
    that imported it first)."""
    script = Path(sys.executable).parent / "cutmix-pl"
    assert script.is_file(), "install the package (pip install -e .) to get the cutmix-pl command"
    args = small(tiny_cifar, trainer__max_epochs=1, trainer__limit_train_batches=2, trainer__enable_model_summary=True)
    done = subprocess.run([str(script), "fit", *args], capture_output=True, text=True, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert list((in_tmp / "runs" / "smoke").glob("version_0/checkpoints/last.ckpt"))
    assert "litlogger" not in text and "LeafSpec" not in text and "weights_only" not in text


def test_the_summary_counts_the_flops_of_one_image(trained):
    """The model's example input is one uint8 32x32 image, which the DataModule normalises as it does a batch, so
    the model summary counts its FLOPs: two per multiply-add of every convolution and of the classifier, counted
    here from the layers' shapes."""
    model = trained[1].model
    macs = []

    def count(layer, inputs, output):
        per_output = layer.in_features if isinstance(layer, torch.nn.Linear) else (
            layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1])
        macs.append(output.numel() * per_output)

    hooks = [layer.register_forward_hook(count) for layer in model.modules()
             if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.net(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert len(macs) == 8  # depth 8: the stem, three blocks of two convolutions, the classifier
    assert ModelSummary(model).total_flops == 2 * sum(macs)


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


def test_compile_transform_reaches_the_transform_and_its_hparam_sits_beside_model_compile(tiny_cifar, in_tmp):
    """data.compile_transform through the CLI: its hparam sits beside model.compile (Lightning merges the two sets of
    hparams when a fit starts and refuses a shared key with different values), and the DataModule's transform
    compiles (test_transform.py checks what a compiled transform computes; no step here, so nothing compiles)."""
    cli = main(["fit", *small(tiny_cifar, data__compile_transform=True, trainer__limit_train_batches=0,
                              trainer__limit_val_batches=0)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 0
    assert cli.datamodule.transform.compile is True
    assert cli.datamodule.hparams.compile_transform is True and cli.model.hparams.compile is False
    assert cli.trainer.logger.log_dir == cli.trainer.log_dir and Path(cli.trainer.log_dir, "hparams.yaml").is_file()


def test_drop_last_trains_the_same_steps_minus_the_ragged_batch(tiny_cifar, in_tmp):
    """The static-shape setting (data.drop_last) changes nothing but the dropped batch: with a constant learning rate
    the loss of every step it keeps equals the default's (ragged last batch kept), bit for bit."""
    losses = []
    for drop in (False, True):
        cli = main(["fit", *small(tiny_cifar, trainer__max_epochs=1, model__lr_schedule="constant",
                                  model__warmup_epochs=0, trainer__precision="32-true", data__train_size=100,
                                  data__drop_last=drop)])
        losses.append([e.value for e in scalars(cli.trainer.log_dir, "train/loss")])
    ragged, static = losses
    assert len(ragged) == 7 and len(static) == 6  # 100 training images in batches of 16: the 4-image batch dropped
    assert static == ragged[:6]
