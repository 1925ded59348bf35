"""Runner pieces for modern networks: augmentation, lr schedules, time budget, test subset, model builders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import kfcrun.train as train_module
from kfcrun.builders import build_model
from kfcrun.checkpoint import load_checkpoint
from kfcrun.cli import _compose, _validate
from kfcrun.data.augment import CropFlip
from kfcrun.errors import ConfigError
from kfcrun.logging import read_metrics
from kfcrun.models import ResNet18Cifar
from kfcrun.optim.lr_schedule import apply_lr_factor, lr_factor


def config(cache_dir: Path, *overrides: str) -> DictConfig:
    cfg = _compose(
        ["experiment=smoke", "trainer.progress=false", f"dataset.cache_dir={cache_dir}", *overrides]
    )
    _validate(cfg)
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    return OmegaConf.create(container)


# -- augmentation -----------------------------------------------------------------------------------
def test_crop_flip_is_a_padded_crop_and_a_mirror() -> None:
    images = torch.randint(
        0, 256, (5, 3, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    aug = CropFlip(seed=3, padding=2)
    out = aug(images, iteration=4)
    gen = aug.generator(4, images.device)  # the same draws, by definition
    offsets = torch.randint(0, 5, (2, 5), generator=gen)
    flips = torch.rand(5, generator=gen) < 0.5
    padded = torch.zeros(5, 3, 10, 11, dtype=torch.uint8)
    padded[:, :, 2:8, 2:9] = images
    for n in range(5):
        dy, dx = offsets[:, n].tolist()
        crop = padded[n, :, dy : dy + 6, dx : dx + 7]
        assert torch.equal(out[n], crop.flip(-1) if flips[n] else crop), f"image {n}"
    assert flips.any() and not flips.all(), "the seed must exercise both branches"
    assert torch.equal(out, CropFlip(seed=3, padding=2)(images, iteration=4)), "a pure function of (seed, k)"
    assert not torch.equal(out, aug(images, iteration=5))


def test_augmented_scheduled_run_resumes_bitwise(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    overrides = [
        "dataset.augment=true",
        "trainer.lr_schedule=cosine",
        "trainer.train_eval_size=64",
        "trainer.test_eval_size=64",
        "trainer.batch_size=16",
        "trainer.max_iters=6",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
    ]
    reference = tmp_path / "reference"
    train_module.train(config(cache_dir, *overrides), reference)

    interrupted = tmp_path / "interrupted"
    real_step = train_module.Trainer.train_step

    def crash_at_5(self):
        if self.iteration == 4:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", crash_at_5)
    with pytest.raises(RuntimeError, match="killed"):
        train_module.train(config(cache_dir, *overrides), interrupted)
    monkeypatch.setattr(train_module.Trainer, "train_step", real_step)
    assert load_checkpoint(interrupted / "checkpoints" / "last.pt")["iteration"] == 3
    train_module.train(config(cache_dir, *overrides, f"resume={interrupted}"), interrupted)

    ref = load_checkpoint(reference / "checkpoints" / "last.pt")
    res = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, res["model"][name]), name
    lrs = [group["lr"] for group in res["optimizer"]["param_groups"]]
    base = [group["base_lr"] for group in res["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([b * lr_factor("cosine", 6, 6) for b in base])


# -- lr schedules -------------------------------------------------------------------------------------
def test_lr_factors() -> None:
    assert [lr_factor("constant", k, 10) for k in (1, 10)] == [1.0, 1.0]
    assert lr_factor("cosine", 1, 10) == 1.0
    assert lr_factor("cosine", 6, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)
    steps = [lr_factor("step", k, 8, (0.5, 0.75), 0.1) for k in range(1, 9)]
    assert steps == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.2}, {"params": [torch.zeros(1)], "lr": 0.4}])
    apply_lr_factor(opt, 0.5)
    apply_lr_factor(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1])
    with pytest.raises(ValueError, match="lr schedule"):
        lr_factor("linear", 1, 10)


def test_schedule_is_refused_for_an_optimizer_that_adapts_its_step(
    tmp_path: Path, cache_dir: Path, monkeypatch
):
    from kfcrun.optim import SGD

    monkeypatch.setattr(SGD, "supports_lr_schedule", False, raising=False)
    with pytest.raises(ConfigError, match=r"trainer\.lr_schedule=step but optimizer sgd adapts"):
        train_module.train(config(cache_dir, "trainer.lr_schedule=step"), tmp_path)


def test_schedule_is_refused_for_kfac_in_one_line(tmp_path: Path, cache_dir: Path):
    """K-FAC chooses alpha every step (App. A.2): a schedule would scale nothing, so it is refused."""
    with pytest.raises(ConfigError, match=r"trainer\.lr_schedule=cosine but optimizer kfac adapts") as err:
        train_module.train(config(cache_dir, "optimizer=kfac", "trainer.lr_schedule=cosine"), tmp_path)
    assert "\n" not in str(err.value) and "fix: trainer.lr_schedule=constant" in str(err.value)


# -- budgets and evaluation subsets ---------------------------------------------------------------------
def test_time_budget_stops_and_evaluates_the_last_iteration(tmp_path: Path, cache_dir: Path, monkeypatch):
    real_step = train_module.Trainer.train_step

    def slow_step(self):
        before = self.clock.total_s
        loss = real_step(self)
        self.clock.total_s = before + 10.0  # every step "takes" exactly 10 s, however loaded the machine
        return loss

    monkeypatch.setattr(train_module.Trainer, "train_step", slow_step)
    row = train_module.train(
        config(
            cache_dir,
            "trainer.max_train_seconds=25",
            "trainer.eval_every=100",
            "trainer.test_eval_size=16",
            "trainer.train_eval_size=16",
        ),
        tmp_path,
    )
    assert row["iter"] == 3 and row["train_time_s"] == pytest.approx(30.0)
    rows = [r for r in read_metrics(tmp_path) if "test/error" in r]
    assert [r["iter"] for r in rows] == [3]
    assert row["test/error"] * 16 == pytest.approx(round(row["test/error"] * 16)), "16 test images"


# -- models -----------------------------------------------------------------------------------------------
def test_resnet18_cifar_shape_and_size() -> None:
    model = ResNet18Cifar()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert isinstance(model.conv1, torch.nn.Conv2d) and model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1) and not any(
        isinstance(m, torch.nn.MaxPool2d) for m in model.modules()
    )
    assert model.layer4[0].conv2.weight[0].numel() == 4608  # KFC's largest Omega
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=resnet18", "model.width=4"], "ResNet18Cifar"),
        (["model=torchvision", "model.arch=mobilenet_v3_small"], "MobileNetV3"),
    ],
)
def test_models_by_config(overrides: list[str], expected: str, cache_dir: Path) -> None:
    cfg = config(cache_dir, *overrides)
    model = build_model(cfg.model, cfg.dataset)
    assert type(model).__name__ == expected
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, cfg.dataset.num_classes)


def test_unknown_torchvision_arch_is_refused_in_one_line(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.arch=resnet19"):
        config(cache_dir, "model=torchvision", "model.arch=resnet19")


def test_resnet18_experiments_run_when_shrunk(tmp_path: Path, cache_dir: Path) -> None:
    """cifar10_resnet18_{sgd,kfc,kfac} end to end on generated data, narrow (full width is slow)."""
    for name, extra in (
        ("cifar10_resnet18_sgd", []),
        ("cifar10_resnet18_kfc", ["optimizer.init_examples=32"]),
        ("cifar10_resnet18_kfac", ["optimizer.init_examples=32"]),
    ):
        cfg = _compose(
            [f"experiment={name}", "+debug=fast", "model.width=4", f"dataset.cache_dir={cache_dir}", *extra]
        )
        _validate(cfg)
        plain = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
        schedule = "constant" if name.endswith("kfac") else "cosine"  # K-FAC adapts alpha: no schedule
        assert plain.dataset.augment and plain.trainer.lr_schedule == schedule
        row = train_module.train(plain, tmp_path / name)
        assert row["iter"] == 3 and math.isfinite(row["train/nll"])


# -- mixed precision and compilation -------------------------------------------------------------------
SHORT = [
    "trainer.max_iters=6",
    "trainer.eval_every=6",
    "trainer.train_eval_size=32",
    "trainer.test_eval_size=32",
]
#: The smoke experiment's optimizer swapped, at the damping the CIFAR-10 experiments use on 0-255 inputs.
OPTIMIZERS = {
    "sgd": ["optimizer=sgd"],
    "kfc_pre": ["optimizer=kfc_pre", "optimizer.damping=1"],
    "kfac": ["optimizer=kfac", "optimizer.damping=1"],
}


@pytest.mark.parametrize(
    ("precision", "optimizer"), [("bf16", "kfc_pre"), ("fp16", "kfc_pre"), ("bf16", "kfac"), ("fp16", "sgd")]
)
def test_half_precision_runs_follow_the_float32_run(
    tmp_path: Path, cache_dir: Path, optimizer: str, precision: str
) -> None:
    """trainer.precision: the forward/backward under autocast (fp16 with a GradScaler) stays close to
    float32; the factors stay float32; the scaler's state is checkpointed."""
    rows = {}
    for run in ("fp32", precision):
        cfg = config(cache_dir, *OPTIMIZERS[optimizer], f"trainer.precision={run}", *SHORT)
        rows[run] = train_module.train(cfg, tmp_path / run)
    assert math.isfinite(rows[precision]["train/nll"])
    assert rows[precision]["train/nll"] == pytest.approx(rows["fp32"]["train/nll"], rel=0.05)
    state = load_checkpoint(tmp_path / precision / "checkpoints" / "last.pt")
    assert bool(state["scaler"]) == (precision == "fp16"), "a GradScaler only for fp16"


def test_compiled_run_gives_the_eager_losses(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    """trainer.compile=true with KFC-pre: the training forward goes through torch.compile and the run
    equals eager exactly. The backend is aot_eager (dynamo + AOT autograd, eager kernels) so that the
    check is exact; inductor's float32 kernels round differently (3e-5 relative on train/nll after 6
    iterations here) and are checked in float64 in tests/optim/test_precision.py (marked slow)."""
    compiled_modules = []
    real_compile = torch.compile

    def aot_eager(module):
        compiled_modules.append(module)
        return real_compile(module, backend="aot_eager")

    torch._dynamo.reset()
    eager = train_module.train(config(cache_dir, *OPTIMIZERS["kfc_pre"], *SHORT), tmp_path / "eager")
    monkeypatch.setattr(train_module.torch, "compile", aot_eager)
    compiled = train_module.train(
        config(cache_dir, *OPTIMIZERS["kfc_pre"], "trainer.compile=true", *SHORT), tmp_path / "compiled"
    )
    assert len(compiled_modules) == 1, "trainer.compile=true did not compile the training forward"
    for key in ("train/nll", "train/nll_current", "test/nll"):
        assert compiled[key] == eager[key], key


def test_compile_with_training_pass_statistics_is_refused_in_one_line(tmp_path: Path, cache_dir: Path):
    with pytest.raises(
        ConfigError, match=r"trainer\.compile=true with optimizer\.stats_from_training"
    ) as err:
        train_module.train(
            config(
                cache_dir, "optimizer=kfc_pre", "optimizer.stats_from_training=true", "trainer.compile=true"
            ),
            tmp_path,
        )
    assert "\n" not in str(err.value)
