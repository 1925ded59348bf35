"""Which modules KFC covers, and the names they go by.

:func:`kfc_layers` is the one definition of coverage: the optimizers, the preconditioner
and the assumption study all ask it. A covered module gets one curvature block
(:mod:`kfcrun.curvature.blocks`); every other trainable parameter is left to the
optimizer's plain step, and :func:`uncovered_modules` names the modules that hold them.

Covered (:func:`covered_parameter_names`):

* ``nn.Conv1d``, ``nn.Conv2d`` (any groups, padding, padding mode), ``nn.Linear``,
  ``nn.Embedding`` (dense gradients): when the weight is trainable; the bias joins the
  block when it exists and is trainable;
* BatchNorm (1d/2d/3d), GroupNorm, LayerNorm, RMSNorm: the trainable ones of their scale
  (``weight``) and shift (``bias``);
* frozen parameters are never covered; a module whose covered parameters are all frozen
  is not covered; ``skip_layers`` removes modules by name or pattern (:func:`layer_matches`);
* a parameter shared by two modules (tied weights, e.g. an embedding and a language-model
  head) is not covered by either: one parameter cannot have two Fisher blocks. Both modules
  are then left to the plain step (and named by :func:`uncovered_modules`). A module that
  runs several times (one module object) is covered; see :mod:`kfcrun.curvature.blocks`.

Layer names are the qualified names of ``model.named_modules()`` with the prefixes
that wrappers insert removed (:func:`canonical_name`): ``DistributedDataParallel``
adds ``module.`` and ``torch.compile`` adds ``_orig_mod.``, so the same network has the
same layer names in configs and checkpoints however it is wrapped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "EMBEDDING_TYPES",
    "KRONECKER_LAYER_TYPES",
    "NORM_LAYER_TYPES",
    "WRAPPER_PREFIXES",
    "canonical_name",
    "covered_parameter_names",
    "eager_module",
    "kfc_layers",
    "layer_matches",
    "uncovered_modules",
    "unmatched_patterns",
]

#: Layers with weights ``W`` acting on (patches of) their input: a Kronecker block ``Omega ⊗ Gamma``.
KRONECKER_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
#: Lookup tables: a Kronecker block with a diagonal input factor.
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding,)
#: Normalization layers whose scale and shift get a per-channel block.
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

#: Name components that wrappers insert around the wrapped model.
WRAPPER_PREFIXES = ("module", "_orig_mod")


def canonical_name(name: str) -> str:
    """``name`` without wrapper components, e.g. ``module._orig_mod.conv1`` -> ``conv1``."""
    parts = [part for part in name.split(".") if part and part not in WRAPPER_PREFIXES]
    return ".".join(parts)


def eager_module(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model._orig_mod``), else ``model`` itself.

    The curvature's own passes (statistics, Fisher-vector products) hook layers at run
    time; a compiled graph would not call hooks registered after compilation, so these
    passes run the same parameters eagerly. The training forward stays compiled.
    """
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    return model


def _trainable(module: nn.Module, attr: str) -> bool:
    param = getattr(module, attr, None)
    return isinstance(param, nn.Parameter) and param.requires_grad


def covered_parameter_names(module: nn.Module) -> list[str]:
    """The names (``"weight"``, ``"bias"``) of ``module``'s parameters a block covers; ``[]`` if none.

    A weight layer is covered only with a trainable weight (the Kronecker block is about
    the weight; a trainable bias alone takes the plain step). A normalization layer is
    covered for whichever of its scale and shift are trainable.
    """
    if isinstance(module, KRONECKER_LAYER_TYPES + EMBEDDING_TYPES):
        if isinstance(module, nn.Embedding) and module.sparse:
            return []
        if not _trainable(module, "weight"):
            return []
        return ["weight"] + (["bias"] if _trainable(module, "bias") else [])
    if isinstance(module, NORM_LAYER_TYPES):
        return [attr for attr in ("weight", "bias") if _trainable(module, attr)]
    return []


def layer_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether layer ``name`` is named by one of ``patterns``.

    A pattern matches its own name, every module below it (``"layer1"`` matches
    ``"layer1.0.conv1"``), and anything it matches as a shell-style wildcard
    (``"*.downsample.*"``, ``"layer[34].*"``).
    """
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns if p)


def unmatched_patterns(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The entries of ``patterns`` that name no module of ``model`` (most likely typos)."""
    names = [canonical_name(n) for n, _ in model.named_modules()]
    return [p for p in patterns if not any(layer_matches(n, [p]) for n in names)]


def kfc_layers(model: nn.Module, skip_layers: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Every module KFC covers, by canonical name, in ``named_modules`` order.

    ``skip_layers`` (names or patterns, see :func:`layer_matches`) leaves modules out:
    they then take the optimizer's plain step, as do modules whose parameters are tied
    to another module's.
    """
    skip = list(skip_layers)
    candidates: dict[str, nn.Module] = {}
    owners: dict[int, int] = {}  # id(parameter) -> number of candidate modules covering it
    for raw, module in model.named_modules():
        name = canonical_name(raw)
        names = covered_parameter_names(module)
        if names and not layer_matches(name, skip):
            candidates[name] = module
            for pname in names:
                pid = id(getattr(module, pname))
                owners[pid] = owners.get(pid, 0) + 1
    return {
        name: module
        for name, module in candidates.items()
        if all(owners[id(getattr(module, p))] == 1 for p in covered_parameter_names(module))
    }


def uncovered_modules(model: nn.Module, skip_layers: Iterable[str] = ()) -> dict[str, list[str]]:
    """``{module name: [trainable parameter names no block covers]}``, leaving out ``skip_layers``.

    These parameters take the optimizer's plain step. The root module's own parameters
    are listed under ``""``; a tied parameter is listed under each module that holds it.
    """
    skip = list(skip_layers)
    covered_modules = kfc_layers(model, skip)
    out: dict[str, list[str]] = {}
    for raw, module in model.named_modules():
        name = canonical_name(raw)
        if layer_matches(name, skip):
            continue
        block_module = covered_modules.get(name)
        covered: set[str] = set()
        if block_module is not None and block_module is module:
            covered = set(covered_parameter_names(block_module))
        missing = [
            pname
            for pname, p in module.named_parameters(recurse=False)
            if p.requires_grad and pname not in covered
        ]
        if missing:
            out[name] = missing
    return out
