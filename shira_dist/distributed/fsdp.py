"""Shard a ShiraModel with FSDP2 (``fully_shard``), or FSDP1 with ``use_orig_params=True``.

    FSDP2                                         per rank, outside forward
    fully_shard(decoder layer i)  for every i     base weight: DTensor Shard(0), rows/world
                                                  SHiRA values: DTensor Shard(0) (1-D), its
                                                  gradient reduce-scattered: adapter-sized
    fully_shard(ShiraModel)       (root: embed, norm, head)

One unit per decoder layer holds its frozen weights and its SHiRA values together (FSDP2
allows mixed requires_grad); only values get gradients, so the reduce-scatter per step is the
adapter's size. Patterns are buffers, replicated (2 bytes per entry). During forward FSDP2
swaps a gathered copy in for each weight; the layers see it is not the weight they wrapped
and run unfused (base forward on the gathered weight plus the sparse product).

FSDP1 flattens each unit into one FlatParameter, and a flat parameter with any trainable
entry gets a gradient buffer of the whole flat size; so :func:`shard_fsdp1` wraps every
frozen Linear/Embedding as its own unit, leaving the layer units with values + norms only.
Create the optimizer after sharding (the parameters are replaced).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ..model import ShiraModel
from .common import rank_and_world, unwrap_shira_model


def decoder_layers(model: nn.Module, layer_classes: Optional[Iterable[type]] = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: instances of ``layer_classes``, or of the
    Hugging Face model's ``_no_split_modules`` (e.g. LlamaDecoderLayer) when not given."""
    base = unwrap_shira_model(model).model
    if layer_classes is not None:
        classes = tuple(layer_classes)
        layers = [m for m in base.modules() if isinstance(m, classes)]
        wanted = [c.__name__ for c in classes]
    else:
        wanted = list(getattr(base, "_no_split_modules", None) or [])
        layers = [m for m in base.modules() if type(m).__name__ in wanted]
    if not layers:
        raise ValueError(f"no decoder layers found in {type(base).__name__} (looked for {wanted or 'nothing'}: "
                         "the model has no _no_split_modules); pass layer_classes=[YourDecoderLayer]")
    return layers


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def shard_fsdp2(model: nn.Module, mesh: Optional[DeviceMesh] = None,
                layer_classes: Optional[Iterable[type]] = None, reshard_after_forward: bool = True,
                cpu_offload: bool = False, mp_policy: Optional[MixedPrecisionPolicy] = None) -> ShiraModel:
    """``fully_shard`` every decoder layer, then the root; returns the (same) ShiraModel.

    Args:
        model: a ShiraModel (before any other wrapping), the same on every rank.
        mesh: 1-D device mesh (default: all ranks, on the parameters' device type).
        layer_classes: the blocks to shard one by one (default: ``_no_split_modules``).
        reshard_after_forward: free each layer's gathered weights after forward (ZeRO-3-like
            memory; re-gathered for backward).
        cpu_offload: keep sharded parameters (and their gradients) on the CPU.
        mp_policy: FSDP2 mixed precision (e.g. bf16 compute, fp32 reduce), or None.
    """
    shira = unwrap_shira_model(model)
    if shira is not model:
        raise TypeError(f"shard_fsdp2 takes the ShiraModel itself, not a {type(model).__name__} around it")
    if mesh is None:
        mesh = init_device_mesh(_device_type(shira), (rank_and_world()[1],))
    shira.unfuse()  # sharding copies the weights: W0, not a fused write
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(shira, layer_classes):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload,
                    mp_policy=mp_policy)
    # The root (embeddings, final norm, head) keeps FSDP2's default: not resharded after
    # forward, since the head is the first thing the backward needs.
    fully_shard(shira, mesh=mesh, offload_policy=offload, mp_policy=mp_policy)
    return shira


def _frozen_leaf(module: nn.Module) -> bool:
    params = list(module.parameters())
    return isinstance(module, (nn.Linear, nn.Embedding)) and bool(params) and not any(p.requires_grad for p in params)


def shard_fsdp1(model: nn.Module, layer_classes: Optional[Iterable[type]] = None,
                device_id: Optional[torch.device] = None) -> nn.Module:
    """FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``); returns the FSDP root.

    Units: every frozen Linear/Embedding (so no FlatParameter mixes a large frozen weight
    with trainable values), every decoder layer, and the root. Prefer :func:`shard_fsdp2`.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import CustomPolicy

    shira = unwrap_shira_model(model)
    if shira is not model:
        raise TypeError(f"shard_fsdp1 takes the ShiraModel itself, not a {type(model).__name__} around it")
    shira.unfuse()
    layers = {id(m) for m in decoder_layers(shira, layer_classes)}
    policy = CustomPolicy(lambda m: id(m) in layers or _frozen_leaf(m))
    device_id = device_id or (torch.device("cuda", torch.cuda.current_device())
                              if _device_type(shira) == "cuda" else torch.device("cpu"))
    with warnings.catch_warnings():  # layer units mix frozen norms with values on purpose (norms are tiny)
        warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False")
        return FSDP(shira, auto_wrap_policy=policy, use_orig_params=True, device_id=device_id)


def fsdp1_units_with_trainables(model: nn.Module) -> list[nn.Module]:
    """The FSDP1 units whose own (not nested units') parameters include trainable ones."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def own_params(unit: nn.Module):
        stack = [unit.module]
        while stack:
            m = stack.pop()
            yield from m.parameters(recurse=False)
            stack += [c for c in m.children() if not isinstance(c, FSDP)]

    return [u for u in FSDP.fsdp_modules(model) if any(p.requires_grad for p in own_params(u))]

