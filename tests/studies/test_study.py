"""The assumption study end to end: DS wiring, networks from checkpoints or training, outputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kfcrun.cli import _compose, _validate
from kfcrun.curvature import nll_sum, sample_targets
from kfcrun.errors import CheckpointError, ConfigError
from kfcrun.models import SrivastavaSVHNNet
from kfcrun.studies.assumptions import collect_statistics, conv_layers, run_assumption_study
from kfcrun.studies.correlations import autocorrelation, cross_map_correlation
from tests.conftest import run_cli

LAYERS = ["conv1", "conv2", "conv3"]
SUMMARY_KEYS = {
    "spatial_offcentre",
    "spatial_offcentre_all_maps",
    "spatial_neighbours",
    "cross_map_offdiag",
    "maps",
    "dead_maps",
    "map_size",
    "position",
    "examples",
}
#: Tiny, fast smoke settings: 128 synthetic images, 3 training iterations, 40 examples of statistics.
TINY = [
    "experiment=smoke",
    "task=assumptions",
    "trainer.progress=false",
    "logger.tensorboard=false",
    "dataset.num_train=128",
    "dataset.num_test=32",
    "trainer.batch_size=16",
    "trainer.train_eval_size=32",
    "trainer.eval_batch_size=32",
    "assumptions.train_iters=3",
    "assumptions.num_examples=40",
    "assumptions.batch_size=16",
    "assumptions.max_offset=3",
]


def study_config(cache_dir: Path, *overrides: str, validate: bool = True) -> DictConfig:
    """The composed config without the ``hydra`` node, as the task function sees it."""
    cfg = _compose([*TINY, f"dataset.cache_dir={cache_dir}", *overrides])
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    plain = OmegaConf.create(container)
    if validate:
        _validate(plain)
    return plain


# ---------------------------------------------------------------------------------------------
# DS: sampled targets, per-example loss, derivative w.r.t. each conv OUTPUT
# ---------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(5 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


def test_derivatives_are_those_of_the_sampled_per_example_nll_at_the_conv_outputs():
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(12, 3, 8, 8)
    batches = list(x.split(5))
    stats = collect_statistics(model, batches, max_offset=2, generator=torch.Generator().manual_seed(7))

    # Oracle: the same draws, derivatives by retain_grad on the conv outputs, one batch at a time.
    generator = torch.Generator().manual_seed(7)
    ds = {n: [] for n in ("conv1", "conv2")}
    acts = {n: [] for n in ("conv1", "conv2")}
    for batch in batches:
        out1 = model.conv1(batch)
        h1 = torch.relu(out1)
        out2 = model.conv2(h1)
        logits = model.fc(model.pool(torch.relu(out2)).flatten(1))
        assert torch.allclose(logits, model(batch))
        loss = nll_sum(logits, sample_targets(logits, generator))
        g1, g2 = torch.autograd.grad(loss, [out1, out2])
        ds["conv1"].append(g1)
        ds["conv2"].append(g2)
        acts["conv1"].append(batch)
        acts["conv2"].append(h1.detach())
    for name in ("conv1", "conv2"):
        for quantity, values in (("derivatives", ds[name]), ("activations", acts[name])):
            acc = getattr(stats[name], quantity)
            whole = torch.cat(values)
            assert torch.allclose(acc.autocorrelation(), autocorrelation(whole, 2), atol=1e-10), (
                name,
                quantity,
            )
            assert torch.allclose(acc.cross_map(), cross_map_correlation(whole), atol=1e-10, equal_nan=True)
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # mode restored


def test_svhn_network_in_train_mode_with_dropout():
    torch.manual_seed(0)
    model = SrivastavaSVHNNet(image_size=16, dropout=True).eval()
    stats = collect_statistics(
        model,
        [torch.randn(4, 3, 16, 16)],
        max_offset=2,
        generator=torch.Generator().manual_seed(0),
        mode="train",
        progress=False,
    )
    assert list(stats) == LAYERS == list(conv_layers(model))
    assert [s.derivatives.shape for s in stats.values()] == [(96, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert [s.activations.shape for s in stats.values()] == [(3, 16, 16), (96, 8, 8), (128, 4, 4)]
    assert not model.training


# ---------------------------------------------------------------------------------------------
# end to end on the smoke experiment
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_study(tmp_path_factory, cache_dir: Path) -> tuple[Path, dict]:
    """The study without checkpoints: trains a paper-pooling and an average-pooling network first."""
    run_dir = tmp_path_factory.mktemp("study")
    summary = run_assumption_study(study_config(cache_dir), run_dir)
    return run_dir, summary


def _assert_close(got, want, path: str = "results") -> None:
    """Nested summaries agree: numbers to 1e-9 (thread counts may change the last bits), the rest exactly."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            _assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-9), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got} != {want}"


def _check_summary(summary: dict, run_dir: Path) -> None:
    assert json.loads((run_dir / "assumptions" / "summary.json").read_text()) == summary
    assert set(summary["results"]) == {"paper", "avg"}
    for pooling, layers in summary["results"].items():
        assert list(layers) == LAYERS, pooling
        for layer, entry in layers.items():
            assert set(entry) == {"derivatives", "activations"}
            for quantity, values in entry.items():
                assert set(values) == SUMMARY_KEYS, (pooling, layer, quantity)
                assert values["examples"] == 40
                for key in ("spatial_offcentre", "spatial_offcentre_all_maps", "cross_map_offdiag"):
                    assert values[key] is not None and 0.0 <= values[key] <= 1.0, (
                        pooling,
                        layer,
                        quantity,
                        key,
                    )
    first = summary["results"]["paper"]["conv1"]
    assert first["derivatives"]["map_size"] == [32, 32] and first["derivatives"]["maps"] == 32
    assert first["activations"]["maps"] == 3 and first["activations"]["position"] == [16, 16]
    assert summary["settings"]["max_offset"] == 3 and summary["settings"]["feature_maps"] == [0, 1, 2]


def test_study_trains_networks_and_writes_figures_and_summary(trained_study):
    run_dir, summary = trained_study
    out = run_dir / "assumptions"
    for quantity in ("derivatives", "activations"):
        for pooling in ("paper", "avg"):
            for suffix in ("png", "pdf"):
                path = out / f"{quantity}_{pooling}.{suffix}"
                assert path.is_file() and path.stat().st_size > 1000, path
    for pooling in ("paper", "avg"):
        assert (run_dir / f"train_{pooling}" / "checkpoints" / "last.pt").is_file()
        raw = torch.load(out / f"correlations_{pooling}.pt")
        assert raw["offsets"] == [-3, -2, -1, 0, 1, 2, 3]
        assert raw["layers"]["conv2"]["derivatives"]["autocorrelation"].shape == (32, 7, 7)
        assert OmegaConf.load(run_dir / f"train_{pooling}" / "config.yaml").model.pooling == pooling
    assert summary["networks"]["avg"]["model"]["pooling"] == "avg"
    assert summary["networks"]["paper"]["iteration"] == 3
    _check_summary(summary, run_dir)
    # Max pooling sparsifies conv1's derivatives (paper Sec. 5.1); visible even after 3 iterations.
    paper, avg = summary["results"]["paper"]["conv1"], summary["results"]["avg"]["conv1"]
    assert paper["derivatives"]["spatial_offcentre"] < avg["derivatives"]["spatial_offcentre"]


def test_study_from_checkpoints_reproduces_the_trained_study(trained_study, tmp_path: Path, cache_dir: Path):
    first_dir, first = trained_study
    cfg = study_config(
        cache_dir,
        f"checkpoint={first_dir / 'train_paper'}",
        f"assumptions.checkpoint_avg={first_dir / 'train_avg' / 'checkpoints' / 'last.pt'}",
    )
    summary = run_assumption_study(cfg, tmp_path)
    assert not list(tmp_path.glob("train_*")), "nothing should be trained when checkpoints are given"
    _check_summary(summary, tmp_path)
    _assert_close(summary["results"], first["results"])  # same networks, examples and target draws


def _save_modified(src: Path, dst: Path, edit) -> Path:
    state = torch.load(src, weights_only=False)
    edit(state)
    torch.save(state, dst)
    return dst


def test_checkpoint_errors_are_one_line(trained_study, tmp_path: Path, cache_dir: Path):
    first_dir, _ = trained_study
    ckpt = first_dir / "train_paper" / "checkpoints" / "last.pt"
    cases: list[tuple[type[Exception], str, list[str]]] = []

    missing = tmp_path / "nowhere"
    cases.append((CheckpointError, "no checkpoint at", [f"checkpoint={missing}"]))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    cases.append((CheckpointError, "unreadable", [f"checkpoint={broken}"]))
    wrong_keys = _save_modified(ckpt, tmp_path / "wrong_keys.pt", lambda s: s["model"].pop("conv2.weight"))
    cases.append((ConfigError, "does not fit the network", [f"checkpoint={wrong_keys}"]))
    other_data = _save_modified(
        ckpt, tmp_path / "svhn.pt", lambda s: s["config"]["dataset"].update(name="svhn")
    )
    cases.append((ConfigError, "dataset.name=svhn", [f"checkpoint={other_data}"]))
    cases.append((ConfigError, "is a pooling=paper network", [f"assumptions.checkpoint_avg={ckpt}"]))
    cases.append((ConfigError, "does not list", [f"checkpoint={ckpt}", "assumptions.poolings=[avg]"]))
    cases.append((ConfigError, "feature_maps", [f"checkpoint={ckpt}", "assumptions.feature_maps=[0,1,3]"]))

    for error, text, overrides in cases:
        # validate=False: the CLI's preflight already refuses a missing path; the task must too.
        cfg = study_config(cache_dir, "assumptions.poolings=[paper]", *overrides, validate=False)
        with pytest.raises(error) as info:
            run_assumption_study(cfg, tmp_path / "run")
        message = str(info.value)
        assert text in message and "\n" not in message and "fix:" in message, message
        print(message)
    assert not missing.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("assumptions.max_offset=0", "assumptions.max_offset=0 is out of range"),
        ("assumptions.feature_maps=[0,-1]", "assumptions.feature_maps=[0, -1] is out of range"),
        ("assumptions.poolings=[maxx]", "allowed: a non-empty list, each entry one of paper | max | avg"),
        ("assumptions.mode=test", "allowed: one of eval | train"),
        (
            "assumptions.checkpoint_avg=/no/such/run",
            "assumptions.checkpoint_avg=/no/such/run has no checkpoint",
        ),
    ],
)
def test_bad_assumption_settings_are_refused(override: str, expected: str):
    with pytest.raises(ConfigError) as info:
        _validate(_compose(["experiment=smoke", "task=assumptions", override]))
    assert expected in str(info.value), str(info.value)


def test_cli_runs_the_study_from_a_checkpoint(trained_study, tmp_path: Path, cache_dir: Path):
    first_dir, first = trained_study
    run_dir = tmp_path / "cli"
    args = [a for a in TINY if not a.startswith("trainer.progress")]
    result = run_cli(
        [
            *args,
            f"checkpoint={first_dir / 'train_paper'}",
            "assumptions.poolings=[paper]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr
    assert "pooling  layer" in result.stdout and "conv3" in result.stdout
    summary = json.loads((run_dir / "assumptions" / "summary.json").read_text())
    _assert_close(summary["results"], {"paper": first["results"]["paper"]})
