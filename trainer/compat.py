"""The one seam between the trainer and the internals of DeepSpeed and transformers.

The trainer leans on a few names these libraries do not promise to keep: DeepSpeed's op registry
(`deepspeed.ops.__compatible_ops__`), the private partitioning hooks of its `PipelineModule`
(`_partition_layers`, `_topo`, `_set_bounds`), its engine's step counter (`global_steps`), its
topology class deep in `deepspeed.runtime` and the axis names its grid looks up; transformers'
per-family modeling modules (named by the family table, `pipelora.families`), the config's private
`_attn_implementation`, the `position_embeddings` keyword of a decoder layer and the layer-type
argument of Gemma 3's rotary embedding. Each is touched here and nowhere else, so an
upgrade is reviewed in one file, and `check_versions` refuses, at start-up and in one sentence,
versions this seam was not tested with: a renamed internal would otherwise surface as a
traceback on some rank minutes into a run.

Widening `SUPPORTED` is a decision to test: run the trainer tests against the new version first.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import torch
from torch import nn

from pipelora.families import family_of
from pipelora.trainer.errors import TrainerError

__all__ = [
    "SUPPORTED",
    "attention_implementation",
    "attention_implementation_of",
    "attention_mask",
    "call_decoder_layer",
    "check_versions",
    "data_major_topology",
    "disable_shm_comm",
    "family_classes",
    "release_last_stage_outputs",
    "installed_versions",
    "parse_version",
    "pipeline_module_cut_at",
    "requirement",
    "rotary_embedding",
    "set_attention_implementation",
    "set_global_steps",
    "version_problems",
]

# package -> (lowest supported version, first unsupported version): the range the tests ran on.
SUPPORTED: dict[str, tuple[str, str]] = {
    "deepspeed": ("0.19.8", "0.20"),
    "transformers": ("5.24", "5.25"),
}

_RELEASE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


# -- versions ------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, ...] | None:
    """The release numbers of a version string (`0.19.8+cpu` -> (0, 19, 8)); None if it has none."""
    match = _RELEASE.match(text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _padded(version: tuple[int, ...], width: int) -> tuple[int, ...]:
    return version + (0,) * (width - len(version))


def requirement(package: str) -> str:
    """The supported range of `package` as a pip requirement (`deepspeed>=0.19.8,<0.20`)."""
    low, high = SUPPORTED[package]
    return f"{package}>={low},<{high}"


def version_problems(installed: Mapping[str, str | None]) -> list[str]:
    """One clause per supported package whose installed version (None: not installed) is outside
    `SUPPORTED`; a pure function of the version strings, so any version can be checked."""
    problems: list[str] = []
    for package, (low, high) in SUPPORTED.items():
        found = installed.get(package)
        if found is None:
            problems.append(f"{package} is not installed (the trainer needs {requirement(package)})")
            continue
        version = parse_version(found)
        lowest, beyond = parse_version(low) or (), parse_version(high) or ()
        width = max(len(lowest), len(beyond), len(version or ()))
        if version is None or not (_padded(lowest, width) <= _padded(version, width) < _padded(beyond, width)):
            problems.append(f"{package} {found} is installed but the trainer supports {requirement(package)}")
    return problems


def installed_versions() -> dict[str, str | None]:
    """Installed versions of the packages in `SUPPORTED`, read from their metadata (no import)."""
    versions: dict[str, str | None] = {}
    for package in SUPPORTED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Refuse to train with library versions the internals below were not tested against."""
    problems = version_problems(installed_versions() if installed is None else installed)
    if problems:
        wanted = " ".join(f"'{requirement(p)}'" for p in SUPPORTED)
        raise TrainerError(f"{'; '.join(problems)}: install the tested versions (pip install {wanted})")


# -- DeepSpeed -------------------------------------------------------------------------------------
def disable_shm_comm() -> None:
    """Keep DeepSpeed's CPU accelerator from building its shared-memory all-reduce op.

    The op is C++ compiled on first use (minutes on a small machine, in every fresh container);
    marking it incompatible in DeepSpeed's op registry makes the CPU accelerator use gloo, which
    carries the tiny LoRA all-reduce just as well.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def data_major_topology(*, stages: int, data_parallel: int) -> Any:
    """DeepSpeed's rank grid with one pipeline's stages on consecutive ranks.

    DeepSpeed's own pipeline topology is pipe-major (a stage's replicas on consecutive ranks);
    this builds its `ProcessTopology` (not re-exported by `deepspeed.pipe`) with the two axes
    swapped, naming them as DeepSpeed's grid looks them up, taken from its own topology.
    """
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology

    pipe_axis, data_axis = PipeDataParallelTopology(num_pp=stages, num_dp=data_parallel).get_axis_names()
    return ProcessTopology(axes=[data_axis, pipe_axis], dims=[data_parallel, stages])


def pipeline_module_cut_at(bounds: Sequence[int], *, layers: list[Any], topology: Any,
                           loss_fn: Callable[..., torch.Tensor]) -> Any:
    """A DeepSpeed `PipelineModule` whose stage s builds items [bounds[s], bounds[s+1]).

    DeepSpeed offers only its own partition methods (uniform, by parameters, by layer type); a
    given cut goes in through the private method that computes one, which must set `parts` and
    the local bounds exactly as DeepSpeed's own implementation does.
    """
    from deepspeed.pipe import PipelineModule

    cut = list(bounds)

    class FixedCutPipelineModule(PipelineModule):
        def _partition_layers(self, method: str = "uniform") -> None:
            self.parts = list(cut)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return FixedCutPipelineModule(layers=layers, topology=topology, loss_fn=loss_fn, partition_method="uniform",
                                  activation_checkpoint_interval=0)


def set_global_steps(engine: Any, step: int) -> None:
    """Tell a resumed engine how many optimizer steps it has taken (it has no public setter)."""
    engine.global_steps = step


# -- transformers ------------------------------------------------------------------------------------
def release_last_stage_outputs(engine: Any) -> None:
    """Drop the last stage's logits as soon as its backward is done.

    DeepSpeed's pipeline engine keeps each micro-batch's outputs in a pipe buffer until the buffer
    is reused; on the last stage those are the logits (seq x vocab per micro-batch), which nothing
    reads after the loss's backward, so two stale copies sat in memory through every step.
    """
    if not engine.is_last_stage():
        return
    from deepspeed.runtime.pipe import schedule

    backward = type(engine)._INSTRUCTION_MAP[schedule.BackwardPass]

    def backward_then_release(self: Any, buffer_id: int) -> None:
        backward(self, buffer_id)
        self.pipe_buffers["outputs"][buffer_id] = None

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.BackwardPass: backward_then_release}


def family_classes(config: Any) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(decoder layer, RMSNorm, rotary embedding) classes of the config's model family.

    The pipeline builds layers one at a time rather than whole models, so it needs these classes
    from the per-family modeling modules, whose contents transformers reorganises freely; which
    module and which names is the family table's (`pipelora.families`).
    """
    family = family_of(config)
    module = importlib.import_module(f"transformers.models.{family.modeling}.modeling_{family.modeling}")
    return getattr(module, family.decoder_layer), getattr(module, family.norm), getattr(module, family.rotary)


def attention_implementation(config: Any) -> str:
    """The attention kernel for layers of `config`: sdpa, unless the config caps attention logits
    (Gemma 2), which sdpa cannot do and transformers' eager attention does."""
    capped = family_of(config).attention_softcap and getattr(config, "attn_logit_softcapping", None)
    return "eager" if capped else "sdpa"


def attention_implementation_of(config: Any) -> str | None:
    """The attention kernel layers of `config` are set to use."""
    name: str | None = config._attn_implementation
    return name


def set_attention_implementation(config: Any, name: str) -> None:
    """Choose the attention kernel of layers built from `config` (normally chosen by
    `from_pretrained`, which the pipeline does not call)."""
    config._attn_implementation = name


def attention_mask(config: Any, allowed: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """The mask a decoder layer of `config` takes for the boolean `allowed` [batch, 1, q, k].

    sdpa takes the booleans as they are; eager attention adds the mask to its scores, so it gets
    0 where attention is allowed and the dtype's lowest value where it is not (as transformers
    builds it for eager layers).
    """
    if config._attn_implementation != "eager":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def rotary_embedding(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, *,
                     layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) for `position_ids`; families with one table per layer type (Gemma 3) take
    the layer's type as a third argument."""
    if layer_type is None:
        cos, sin = rotary(hidden, position_ids)
    else:
        cos, sin = rotary(hidden, position_ids, layer_type)
    return cos, sin


def call_decoder_layer(layer: nn.Module, hidden: torch.Tensor, *, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decoder layer's forward pass with RoPE (cos, sin) computed by the caller.

    Each stage recomputes RoPE from the integer position_ids it receives, and hands it to the
    layer through the keyword its model's forward uses internally; the layer returns the hidden
    state alone.
    """
    out: torch.Tensor = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                              position_embeddings=rope)
    return out
