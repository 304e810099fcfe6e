import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cutmix_pl.data import CIFAR10DataModule
from cutmix_pl.model_callbacks import NonFiniteLossWatch
from cutmix_pl.module import ImageClassifier, SoftTargetCrossEntropy
from cutmix_pl.resnet import ResNet
from cutmix_pl.schedules import SCHEDULES, lr_factor


def test_soft_ce_equals_cross_entropy_on_one_hot_and_integer_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, F.one_hot(labels, 10).float()), ce)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, labels), ce)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_label_smoothing_matches_torch(eps):
    torch.manual_seed(1)
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    expected = F.cross_entropy(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(SoftTargetCrossEntropy(eps)(logits, labels), expected)
    torch.testing.assert_close(SoftTargetCrossEntropy(eps)(logits, F.one_hot(labels, 10).float()), expected)


def test_soft_targets_follow_the_definition():
    torch.manual_seed(2)
    logits, t = torch.randn(8, 10), torch.softmax(torch.randn(8, 10), -1)
    expected = -(t * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, t), expected)


def test_smoothing_in_the_loss_equals_mixing_smoothed_targets():
    """Smoothing lives in the loss alone; on mixed targets that equals mixing the smoothed one-hot targets
    (timm's order), because smoothing is affine in the targets."""
    torch.manual_seed(3)
    logits = torch.randn(8, 10)
    a, b = F.one_hot(torch.randint(0, 10, (8,)), 10).float(), F.one_hot(torch.randint(0, 10, (8,)), 10).float()
    lam, eps = torch.rand(8, 1), 0.1
    smooth = lambda t: t * (1 - eps) + eps / 10  # noqa: E731
    ours = SoftTargetCrossEntropy(eps)(logits, lam * a + (1 - lam) * b)
    timm_order = SoftTargetCrossEntropy()(logits, lam * smooth(a) + (1 - lam) * smooth(b))
    torch.testing.assert_close(ours, timm_order)
    assert not torch.allclose(ours, SoftTargetCrossEntropy()(logits, lam * a + (1 - lam) * b))


def test_evaluation_loss_is_plain_cross_entropy_whatever_the_smoothing(tiny_cifar, tmp_path):
    """val/loss, as validate logs it, is the same for the same weights whatever model.label_smoothing, and equals
    the plain cross-entropy of the validation images."""
    dm = CIFAR10DataModule(str(tiny_cifar), download=False, val_size=100, eval_batch_size=50)
    logged = []
    for eps in (0.0, 0.2):
        torch.manual_seed(5)  # the same initial weights
        model = ImageClassifier(net=ResNet(depth=8, width=4), label_smoothing=eps, log_images=False)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        logged.append(trainer.validate(model, dm, verbose=False)[0]["val/loss"])
    images, labels = dm.split("val").images, dm.split("val").labels
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(dm.transform.normalize(images)), labels).item()
    assert logged[0] == pytest.approx(logged[1], abs=1e-6) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smoothing_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftTargetCrossEntropy(eps)


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)
    assert [lr_factor(s, 100, 0, "step") for s in (49, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])
    assert lr_factor(70, 100, 0, "constant") == 1.0


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("max_epochs, max_steps", [(3, -1), (-1, 18), (50, 18)])
def test_warm_up_is_one_epoch_and_the_schedule_ends_at_the_run_s_end(max_epochs, max_steps, tiny_cifar, tmp_path):
    """Warm-up lasts warmup_epochs of the loader's steps and the cosine reaches 0 at the last step, whether
    max_epochs or max_steps ends the run."""
    lrs = LearningRates()
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, max_steps=max_steps, limit_train_batches=6,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[lrs], default_root_dir=tmp_path)
    model = ImageClassifier(net=ResNet(depth=8, width=4), warmup_epochs=1.0, log_images=False)
    trainer.fit(model, CIFAR10DataModule(str(tiny_cifar), download=False, batch_size=32, val_size=50, mixer=None))
    total = 18
    assert len(lrs.seen) == total
    expected = [0.1 * lr_factor(s, total, 6, "cosine") for s in range(total)]
    assert lrs.seen == pytest.approx(expected)
    assert lrs.seen[5] == pytest.approx(0.1) and lrs.seen[-1] < 0.002


@pytest.mark.parametrize("warmup_epochs, warned", [(3.5, True), (5.0, True), (3.0, False)])
def test_a_warm_up_longer_than_the_run_warns(warmup_epochs, warned, tiny_cifar, tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    model = ImageClassifier(net=ResNet(depth=8, width=4), warmup_epochs=warmup_epochs, log_images=False)
    data = CIFAR10DataModule(str(tiny_cifar), download=False, batch_size=32, val_size=50, mixer=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    said = [str(w.message) for w in seen if "model.warmup_epochs" in str(w.message)]
    assert said == ([f"model.warmup_epochs={warmup_epochs} outlasts the run ({round(warmup_epochs * 2)} warm-up "
                     "steps of 6), so the learning rate never reaches its peak; fix: a smaller model.warmup_epochs, "
                     "or a longer trainer.max_epochs"] if warned else [])


def test_model_argument_checks():
    with pytest.raises(ValueError, match="lr_schedule"):
        ImageClassifier(lr_schedule="exp")
    with pytest.raises(ValueError, match="lr"):
        ImageClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    with pytest.raises(ValueError, match="model.net='resnet' is not a torch.nn.Module"):
        ImageClassifier(net="resnet")
    with pytest.raises(ValueError, match="model.net has num_classes=100 but the model has num_classes=10"):
        ImageClassifier(net=ResNet(num_classes=100))
    with pytest.raises(ValueError, match="model.optimizer=.* is not an optimiser factory"):
        ImageClassifier(optimizer={"class_path": "torch.optim.SGD"})


def test_flip_tta_averages_probabilities_of_image_and_mirror():
    torch.manual_seed(4)
    model = ImageClassifier(net=ResNet(8), tta_flip=True).eval()
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    model.trainer.testing = True  # test/predict; validation never uses TTA
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (model(x).softmax(-1) + model(x.flip(3)).softmax(-1)) / 2
        got = model._predict_logits(x).softmax(-1)
        torch.testing.assert_close(got, expected)
        model.trainer.validating = True
        torch.testing.assert_close(model._predict_logits(x), model(x))


def test_compiled_model_saves_plain_keys_and_old_compiled_checkpoints_still_load():
    compiled = ImageClassifier(compile=True)
    compiled.configure_model()
    compiled.configure_model()  # Lightning may call it again (e.g. for test after fit): compile once
    keys = list(compiled.state_dict())
    assert keys == list(ImageClassifier().state_dict()) and not any("_orig_mod" in k for k in keys)

    # a checkpoint written by torch.compile(module) (earlier versions) carries "_orig_mod." in every key
    source = ImageClassifier()
    wrapped = {k.replace("net.", "net._orig_mod.", 1) if k.startswith("net.") else k: v
               for k, v in source.state_dict().items()}
    checkpoint = {"state_dict": wrapped, "hyper_parameters": dict(source.hparams)}
    plain = ImageClassifier()
    plain.on_load_checkpoint(checkpoint)
    plain.load_state_dict(checkpoint["state_dict"])
    for k, v in source.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v)


@pytest.mark.cuda
def test_watching_the_loss_between_logging_steps_does_not_make_the_host_wait_for_the_gpu():
    watch = NonFiniteLossWatch()  # one of ImageClassifier's callbacks
    trainer = SimpleNamespace(current_epoch=2, global_step=10, log_every_n_steps=50, num_training_batches=100)
    loss = torch.tensor(1.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        watch.check(trainer, loss, 3)
        watch.check(trainer, loss / 0 * 0, 4)  # NaN: recorded on the device, read at the next logging step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.global_step = 49
    with pytest.raises(FloatingPointError, match=r"global step 10 \(epoch 2, batch 4\)"):
        watch.check(trainer, loss, 5)


def test_a_schedule_is_one_table_entry(monkeypatch):
    monkeypatch.setitem(SCHEDULES, "half", lambda p: 0.5)
    assert lr_factor(50, 100, 10, "half") == 0.5
    assert ImageClassifier(net=ResNet(8, width=4), lr_schedule="half").hparams.lr_schedule == "half"
    with pytest.raises(ValueError, match="choose one of cosine, linear, step, constant, half"):
        ImageClassifier(net=ResNet(8, width=4), lr_schedule="nope")
