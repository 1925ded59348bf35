"""The assumption study (paper Sec. 5.1, Figs. 1-2): ``kfcrun task=assumptions``.

KFC's Fisher block ``Omega ⊗ Gamma`` rests on spatially uncorrelated derivatives (SUD):
``Gamma(i, i', delta) = E[Ds_{i,t} Ds_{i',t+delta}] = 0`` for ``delta != 0``. The paper
checks it by looking at, for every conv layer of a trained network,

* Fig. 1(a): the spatial autocorrelation ``rho_i(delta)`` of the pre-activation
  derivatives ``DS`` of three feature maps, ``delta`` in ``[-K, K]^2``;
* Fig. 1(b): the correlations between maps at one spatial position (the centre);
* Fig. 1(c, d): the same for the network with average pooling everywhere;
* Fig. 2: the same two statistics for the activations (the conv layer's INPUT, whose
  uncentered second moments make up ``Omega``).

Definitions and normalization are in :mod:`kfcrun.studies.correlations`: uncentered
second moments normalized to correlations (``|rho| <= 1``, ``rho(0) = 1``), pairs only
where both positions are inside the map. For ``DS`` uncentered = centered, because
``E[DS] = 0`` under the model's distribution; for the activations the uncentered
version is what Fig. 2 shows.

How ``DS`` is obtained (paper Sec. 2.2, 3.1): per batch, a
forward pass records each conv layer's input and output
(:class:`~kfcrun.curvature.capture.ActivationCapture`), targets are SAMPLED from the
model's predictive distribution ``y ~ softmax(logits)`` with a seeded generator, and
``DS = d(sum_n -log p(y_n|x_n)) / d(conv output)`` (per-example losses, summed).

Choices (documented, and set by ``assumptions.*`` where it matters):

* **Mode.** ``assumptions.mode=eval`` (default): the deterministic network, whose
  predictive distribution is the one the trained model reports; the paper's CIFAR-10
  network has no dropout or batch norm, so eval and train mode are the same network
  there. ``mode=train`` runs it as KFC-pre's statistics pass does during training:
  dropout on (its masks are part of the sampled derivatives), batch norm with batch
  statistics (its running buffers are restored afterwards).
* **Parameters.** The checkpoint's ``model`` state, i.e. the CURRENT iterate, not the
  exponential average kept in the optimizer state (late in training the two differ
  little, and the study is about the structure of the model's distribution).
* **Network settings** (pooling, batch norm, dropout) come from the checkpoint's own
  config; the dataset and the model name must agree with this run's config.
* **Examples.** ``assumptions.num_examples`` training images, a fixed random subset drawn
  with ``seed``, preprocessed as in training.

Outputs under ``<run_dir>/assumptions/``: ``derivatives_<pooling>.{png,pdf}``,
``activations_<pooling>.{png,pdf}`` (rows: conv layers; columns: the chosen maps'
``|rho|`` and the cross-map ``|R|``, fixed colour scale 0..1), ``correlations_<pooling>.pt``
(every map's ``rho`` and the full ``R``, for replotting) and ``summary.json``
(:func:`summarize_layer`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kfcrun.analysis.runs import cfg_get
from kfcrun.checkpoint import checkpoint_path, find_checkpoint, load_checkpoint
from kfcrun.curvature import kfc_layers, nll_sum, output_derivatives, sample_targets
from kfcrun.errors import CheckpointError, ConfigError
from kfcrun.logging import write_json
from kfcrun.schema import choice, integer, list_of, text
from kfcrun.studies.correlations import (
    CorrelationAccumulator,
    mean_abs_cross_map,
    mean_abs_offcentre,
)
from kfcrun.studies.heatmaps import LayerPanel, plot_correlation_grid

__all__ = [
    "AssumptionSettings",
    "LayerStatistics",
    "Network",
    "collect_statistics",
    "conv_layers",
    "run_assumption_study",
    "summarize_layer",
]

#: Config keys a checkpoint must share with this run: the data it was trained on and its network.
MATCHING_KEYS = (
    "model.name",
    "dataset.name",
    "dataset.num_classes",
    "dataset.channels",
    "dataset.image_size",
    "dataset.mean",
    "dataset.std",
    "dataset.pixel_scale",
)
#: Model settings taken from the checkpoint's config (they define the architecture).
MODEL_SETTINGS = ("name", "batch_norm", "pooling", "dropout")
QUANTITIES = ("derivatives", "activations")


@dataclass(frozen=True)
class AssumptionSettings:
    """The ``assumptions`` config section: what the study measures, and on which networks.

    Each field carries its config rule (:mod:`kfcrun.schema`); the config validation reads
    them with ``rules_of(AssumptionSettings, "assumptions.")``. Defaults are those of
    ``configs/config.yaml``.

    Attributes:
        num_examples: training images the statistics average over (a fixed random subset,
            drawn with ``seed``).
        batch_size: images per forward/backward pass (memory only; results do not depend on it).
        max_offset: spatial offsets shown: ``delta`` in ``[-max_offset, max_offset]^2`` (Fig. 1a, 2a).
        feature_maps: the maps whose autocorrelations are drawn (any three, paper Fig. 1a).
        poolings: networks studied: the published pooling (``paper``, Fig. 1a,b) and
            average pooling (``avg``, Fig. 1c,d); ``max`` is max pooling everywhere.
        checkpoint_avg: run dir (or checkpoint file) of a ``model.pooling=avg`` network;
            ``None``: train one.
        train_iters: iterations of training for a network no checkpoint provides.
        mode: ``eval``: the deterministic network; ``train``: dropout on, batch norm with
            batch statistics (as KFC-pre's statistics pass sees it).
    """

    num_examples: Annotated[int, integer(1, "2000")] = 2000
    batch_size: Annotated[int, integer(1, "250")] = 250
    max_offset: Annotated[int, integer(1, "4")] = 4
    feature_maps: Annotated[list[int], list_of(integer(0, "0"), "[0,1,2]")] = field(
        default_factory=lambda: [0, 1, 2]
    )
    poolings: Annotated[list[str], list_of(choice("paper", "max", "avg"), "[paper,avg]")] = field(
        default_factory=lambda: ["paper", "avg"]
    )
    checkpoint_avg: Annotated[str | None, text("outputs/<date>/<run>", optional=True)] = None
    train_iters: Annotated[int, integer(1, "2000")] = 2000
    mode: Annotated[str, choice("eval", "train")] = "eval"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AssumptionSettings:
        """The settings of a run config's ``assumptions`` section."""
        return cls(**cast("dict[str, Any]", OmegaConf.to_container(cfg.assumptions, resolve=True)))


def _say(message: str) -> None:
    print(f"kfcrun: assumptions: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# statistics of one network
# ---------------------------------------------------------------------------------------------
def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convolutions among the layers KFC covers (:func:`~kfcrun.curvature.kfc_layers`), in model order."""
    return {name: m for name, m in kfc_layers(model).items() if isinstance(m, nn.Conv2d)}


@dataclass
class LayerStatistics:
    """Running sums for one conv layer: its output derivatives ``DS`` and its input activations."""

    derivatives: CorrelationAccumulator
    activations: CorrelationAccumulator

    def accumulator(self, quantity: str) -> CorrelationAccumulator:
        """The accumulator of ``quantity``: ``"derivatives"`` (``DS``) or ``"activations"``."""
        return getattr(self, quantity)


def collect_statistics(
    model: nn.Module,
    inputs: Iterable[Tensor],
    *,
    max_offset: int,
    generator: torch.Generator,
    mode: str = "eval",
    progress: bool = True,
) -> dict[str, LayerStatistics]:
    """Correlation sums of ``DS`` and of the inputs of every conv layer, over all batches of ``inputs``.

    For each batch: one recorded forward pass, ``y ~ softmax(logits)`` drawn with
    ``generator`` (on the logits' device), then ``torch.autograd.grad`` of
    ``sum_n -log p(y_n | x_n)`` with respect to every conv layer's output. Parameter
    ``.grad`` fields are not touched. ``mode`` is ``"eval"`` or ``"train"`` (module
    docstring); the model's mode and buffers are restored on return.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    layers = conv_layers(model)
    if not layers:
        raise ValueError("the model has no Conv2d layer")
    stats = {
        name: LayerStatistics(CorrelationAccumulator(max_offset), CorrelationAccumulator(max_offset))
        for name in layers
    }
    first = next(iter(layers))
    live = progress and sys.stdout.isatty()
    start = time.perf_counter()
    was_training = model.training
    model.train(mode == "train")

    def sampled_nll(logits: Tensor) -> Tensor:
        return nll_sum(logits, sample_targets(logits, generator))

    try:
        for index, batch in enumerate(inputs, start=1):
            layer_inputs, derivatives = output_derivatives(model, batch, sampled_nll, layers)
            for name in layers:
                stats[name].derivatives.update(derivatives[name])
                stats[name].activations.update(layer_inputs[name])
            if live:
                print(f"\r  batch {index}: {stats[first].derivatives.count} examples", end="", flush=True)
    finally:
        model.train(was_training)
        if live:
            print(flush=True)
    if progress:
        print(
            f"  {stats[first].derivatives.count} examples in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return stats


def summarize_layer(acc: CorrelationAccumulator, feature_maps: Sequence[int]) -> dict[str, Any]:
    """The numbers ``summary.json`` keeps for one layer and quantity.

    * ``spatial_offcentre``: mean ``|rho_c(delta)|`` over the chosen maps ``c`` and all
      offsets ``delta != 0`` in ``[-K, K]^2`` (SUD says ~0 for derivatives);
    * ``spatial_offcentre_all_maps``: the same over every map of the layer;
    * ``spatial_neighbours``: the same over the chosen maps and the 8 nearest offsets;
    * ``cross_map_offdiag``: mean ``|R[c, c']|``, ``c != c'``, at the centre position;
    * ``maps``, ``dead_maps`` (maps identically zero: their correlations are undefined and
      left out of the means), ``map_size``, ``position``, ``examples``.

    Means are ``null`` when no entry is defined.
    """
    rho = acc.autocorrelation()
    k = acc.max_offset
    assert acc.shape is not None and acc.cross is not None and acc.position is not None
    dead = int((acc.cross[:, k, k] == 0).sum())
    chosen = rho[list(feature_maps)]
    return {
        "spatial_offcentre": mean_abs_offcentre(chosen),
        "spatial_offcentre_all_maps": mean_abs_offcentre(rho),
        "spatial_neighbours": mean_abs_offcentre(chosen, radius=1),
        "cross_map_offdiag": mean_abs_cross_map(acc.cross_map()),
        "maps": acc.shape[0],
        "dead_maps": dead,
        "map_size": list(acc.shape[1:]),
        "position": list(acc.position),
        "examples": acc.count,
    }


# ---------------------------------------------------------------------------------------------
# getting a network: a checkpoint, or a short training run
# ---------------------------------------------------------------------------------------------
@dataclass
class Network:
    """A trained network to study and where it came from."""

    pooling: str
    model: nn.Module
    source: Path  # the checkpoint file
    iteration: int | None
    settings: dict[str, Any]  # model config it was built from


def _checkpoint_file(key: str, value: str) -> Path:
    target = find_checkpoint(value)
    if target is None:
        raise CheckpointError(
            f"{key}={value}: no checkpoint at {checkpoint_path(Path(value).expanduser())}; "
            f"fix: {key}=<a run directory with checkpoints/last.pt, or a checkpoint file>, "
            "or leave it null to train a network first"
        )
    return target


def build_network(settings: Mapping[str, Any], cfg: DictConfig) -> nn.Module:
    """The network ``settings`` (a ``model`` config section) describes, for ``cfg``'s dataset.

    Sections saved before configs named their ``_target_`` are built by model name.
    """
    from kfcrun.builders import build_model
    from kfcrun.models import build_model as build_model_by_name

    if "_target_" in settings:
        return build_model(settings, cfg.dataset)
    return build_model_by_name(
        settings["name"],
        num_classes=cfg.dataset.num_classes,
        in_channels=cfg.dataset.channels,
        image_size=cfg.dataset.image_size,
        batch_norm=bool(settings.get("batch_norm", False)),
        pooling=str(settings.get("pooling", "paper")),
        dropout=bool(settings.get("dropout", True)),
    )


def load_network(cfg: DictConfig, key: str, value: str) -> Network:
    """Load the network of checkpoint ``key=value`` (a run dir or a checkpoint file).

    Raises :class:`CheckpointError` if the file is missing or unreadable and
    :class:`ConfigError` if it was trained on other data, is another model than
    ``cfg.model.name``, or its weights do not fit the network its config describes.
    """
    target = _checkpoint_file(key, value)
    try:
        state = load_checkpoint(target)
    except CheckpointError as err:  # its fix names resume=; name the key used here
        raise CheckpointError(
            f"{key}={value}: {str(err).split('; fix:')[0]}; fix: set {key} to another run dir, "
            "or leave it null to train a network first"
        ) from err
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(
            f"{key}={value}: {target} holds no 'model' state dict; fix: point to a kfcrun run"
        )
    saved = state.get("config")
    ours = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
    if isinstance(saved, Mapping):
        for dotted in MATCHING_KEYS:
            # A kfcrun checkpoint's "config" is the plain dict of OmegaConf.to_container.
            theirs, mine = cfg_get(cast("dict[str, Any]", saved), dotted), cfg_get(ours, dotted)
            if theirs is not None and theirs != mine:
                raise ConfigError(
                    f"config error: {key}={value} holds a network trained with {dotted}={theirs}, but this "
                    f"run has {dotted}={mine}; fix: run with {dotted}={theirs} (e.g. the experiment that "
                    f"trained it), or set {key} to a matching run"
                )
        model_cfg = dict(saved.get("model") or ours["model"])
    else:
        _say(f"{target} has no saved config; building it from this run's model settings")
        model_cfg = dict(ours["model"])
    settings = {k: v for k, v in model_cfg.items() if k in MODEL_SETTINGS or k == "_target_"}
    model = build_network(settings, cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        detail = (detail or str(err).strip() or type(err).__name__)[:300]
        raise ConfigError(
            f"config error: {key}={value} does not fit the network its config describes "
            f"({', '.join(f'{k}={v}' for k, v in settings.items() if k != '_target_')}): {detail}; "
            "fix: point to a checkpoint written by kfcrun for this model"
        ) from err
    return Network(settings["pooling"], model, target, state.get("iteration"), settings)


def train_network(cfg: DictConfig, pooling: str, train_dir: Path) -> Path:
    """Train ``cfg``'s network with ``model.pooling=pooling`` for ``assumptions.train_iters`` iterations.

    The run is an ordinary ``task=train`` run in ``train_dir`` (config.yaml, metrics,
    checkpoint); returns the path of its final checkpoint.
    """
    from kfcrun.config import validate_config
    from kfcrun.train import train

    container = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
    container.pop("hydra", None)
    run_cfg = OmegaConf.create(container)
    iters = AssumptionSettings.from_config(cfg).train_iters
    for dotted, value in {
        "task": "train",
        "checkpoint": None,
        "resume": None,
        "model.pooling": pooling,
        "trainer.max_iters": iters,
        "trainer.max_epochs": None,
        "trainer.checkpoint_every": iters,
    }.items():
        OmegaConf.update(run_cfg, dotted, value, merge=False)
    validate_config(run_cfg)
    _say(f"no checkpoint for pooling={pooling}: training {cfg.model.name} for {iters} iterations")
    _say(f"training run: {train_dir}")
    train(run_cfg, train_dir)
    return checkpoint_path(train_dir)


def networks_to_study(cfg: DictConfig, run_dir: Path) -> list[Network]:
    """One network per ``assumptions.poolings`` entry: from ``checkpoint`` / ``checkpoint_avg``, or trained.

    ``checkpoint`` is used for the pooling its own config names; ``assumptions.checkpoint_avg``
    must be an average-pooling network.
    """
    settings = AssumptionSettings.from_config(cfg)
    poolings = list(dict.fromkeys(str(p) for p in settings.poolings))
    given: dict[str, Network] = {}
    if cfg.checkpoint is not None:
        net = load_network(cfg, "checkpoint", cfg.checkpoint)
        if net.pooling not in poolings:
            raise ConfigError(
                f"config error: checkpoint={cfg.checkpoint} is a pooling={net.pooling} network, which "
                f"assumptions.poolings={poolings} does not list; "
                f"fix: assumptions.poolings=[{net.pooling},avg]"
            )
        given[net.pooling] = net
    if settings.checkpoint_avg is not None:
        net = load_network(cfg, "assumptions.checkpoint_avg", settings.checkpoint_avg)
        if net.pooling != "avg":
            raise ConfigError(
                f"config error: assumptions.checkpoint_avg={settings.checkpoint_avg} is a "
                f"pooling={net.pooling} network; allowed: a run trained with model.pooling=avg; "
                "fix: point it to such a run, or leave it null to train one"
            )
        if "avg" in given:
            raise ConfigError(
                "config error: checkpoint and assumptions.checkpoint_avg both hold average-pooling networks; "
                "fix: set only one of them"
            )
        if "avg" in poolings:
            given["avg"] = net
    networks = []
    for pooling in poolings:
        if pooling in given:
            net = given[pooling]
            _say(f"pooling={pooling}: {net.source} (iteration {net.iteration})")
        else:
            net = load_network(
                cfg, "checkpoint", str(train_network(cfg, pooling, run_dir / f"train_{pooling}"))
            )
        networks.append(net)
    return networks


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
def _check_feature_maps(model: nn.Module, feature_maps: Sequence[int]) -> None:
    for name, conv in conv_layers(model).items():
        smallest = min(conv.in_channels, conv.out_channels)
        bad = [i for i in feature_maps if i >= smallest]
        if bad:
            raise ConfigError(
                f"config error: assumptions.feature_maps={list(feature_maps)} names map {bad[0]}, but layer "
                f"{name} has {conv.in_channels} input and {conv.out_channels} output maps; allowed: indices "
                f"below {smallest}; fix: e.g. assumptions.feature_maps=[0,1,2]"
            )


def _fmt(value: float | None) -> str:
    return "   -  " if value is None or math.isnan(value) else f"{value:6.3f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as a compact text table (one line per pooling and layer)."""
    cols = ("spatial_offcentre", "spatial_offcentre_all_maps", "spatial_neighbours", "cross_map_offdiag")
    head = "  ".join(f"{c:>6s}" for c in ("spat", "all", "nbr", "cross"))
    lines = [
        f"{'pooling':8s} {'layer':8s} | derivatives DS: {head} | activations A: {head}",
    ]
    for pooling, layers in summary["results"].items():
        for layer, entry in layers.items():
            parts = ["  ".join(_fmt(entry[q][c]) for c in cols) for q in QUANTITIES]
            lines.append(f"{pooling:8s} {layer:8s} | {'':16s}{parts[0]} | {'':15s}{parts[1]}")
    return "\n".join(lines)


def run_assumption_study(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the study as ``cfg.assumptions`` (:class:`AssumptionSettings`) says.

    Writes the figures, ``correlations_<pooling>.pt`` and ``summary.json`` under
    ``<run_dir>/assumptions/``; returns the summary.
    """
    from kfcrun.data import Preprocessor
    from kfcrun.train import load_data, resolve_device

    settings = AssumptionSettings.from_config(cfg)
    run_dir = Path(run_dir)
    out_dir = run_dir / "assumptions"
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    feature_maps = [int(i) for i in settings.feature_maps]
    start = time.perf_counter()

    with torch.device("meta"):  # refuse bad map indices before any training
        model_settings = cast("dict[str, Any]", OmegaConf.to_container(cfg.model, resolve=True))
        _check_feature_maps(build_network(model_settings, cfg), feature_maps)
    networks = networks_to_study(cfg, run_dir)
    for net in networks:
        _check_feature_maps(net.model, feature_maps)

    data = load_data(cfg)
    preprocess = Preprocessor.fit(
        data.train_images, mean=cfg.dataset.mean, std=cfg.dataset.std, pixel_scale=cfg.dataset.pixel_scale
    ).to(device)
    count = min(settings.num_examples, len(data.train_images))
    if count < settings.num_examples:
        _say(f"the training set has only {count} images; using all of them")
    subset = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.seed))[:count]
    images = data.train_images[subset]
    batch_size = settings.batch_size

    def batches() -> Iterable[Tensor]:
        for lo in range(0, count, batch_size):
            yield preprocess(images[lo : lo + batch_size].to(device))

    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "settings": {
            "num_examples": count,
            "max_offset": settings.max_offset,
            "feature_maps": feature_maps,
            "mode": settings.mode,
            "targets": "sampled from the model's predictive distribution",
            "normalization": "uncentered: E[x x'] / sqrt(E[x^2] E[x'^2]); spatial pairs both in-image",
            "parameters": "current iterate (checkpoint 'model')",
            "seed": int(cfg.seed),
        },
        "networks": {},
        "results": {},
    }
    for net in networks:
        tag = net.pooling
        _say(
            f"[{tag}] DS (sampled targets) and activations of {', '.join(conv_layers(net.model))} "
            f"over {count} examples, offsets [-{settings.max_offset}, {settings.max_offset}]^2, "
            f"{settings.mode} mode"
        )
        model = net.model.to(device)
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        stats = collect_statistics(
            model, batches(), max_offset=settings.max_offset, generator=generator, mode=settings.mode
        )
        summary["networks"][tag] = {
            "checkpoint": str(net.source),
            "iteration": net.iteration,
            "model": net.settings,
        }
        summary["results"][tag] = {
            name: {q: summarize_layer(s.accumulator(q), feature_maps) for q in QUANTITIES}
            for name, s in stats.items()
        }
        raw: dict[str, Any] = {}
        for quantity in QUANTITIES:
            panels = []
            for name, s in stats.items():
                acc = s.accumulator(quantity)
                rho = acc.autocorrelation()
                assert acc.shape is not None and acc.position is not None
                raw.setdefault(name, {})[quantity] = {"autocorrelation": rho, "cross_map": acc.cross_map()}
                panels.append(
                    LayerPanel(
                        layer=name,
                        autocorrelations=[rho[i] for i in feature_maps],
                        maps=feature_maps,
                        cross_map=acc.cross_map(),
                        position=acc.position,
                        map_size=(acc.shape[1], acc.shape[2]),
                    )
                )
            what = (
                "pre-activation derivatives DS (sampled targets)"
                if quantity == "derivatives"
                else "activations (conv inputs), uncentered"
            )
            paths = plot_correlation_grid(
                panels,
                f"{net.settings['name']}, pooling={tag}: |correlations| of the {what}; {count} examples",
                out_dir / f"{quantity}_{tag}",
            )
            _say(f"[{tag}] wrote {paths[0]} (+ .pdf)")
        torch.save(
            {"offsets": list(range(-settings.max_offset, settings.max_offset + 1)), "layers": raw},
            out_dir / f"correlations_{tag}.pt",
        )

    write_json(out_dir / "summary.json", summary)
    print(
        "kfcrun: assumptions: mean |correlation| (spat: off-centre offsets of maps "
        f"{feature_maps}; all: every map; nbr: 8 nearest offsets; cross: off-diagonal at the centre)",
        flush=True,
    )
    print(format_table(summary), flush=True)
    _say(f"done in {time.perf_counter() - start:.1f} s; outputs in {out_dir}")
    return summary
