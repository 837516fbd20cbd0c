"""Give a model built under any TP x PP layout the weights of the one-process model, and read them
back in the one-process naming, so that layouts can be compared number for number.

Tensor parallelism needs nothing: the providers initialise full weights on CPU from one seed and
shard them. A pipeline stage, though, builds only its own layers and draws their initial values in
another order, so a stage copies its layers from the model built with one stage (same TP), matched
by each layer's global `layer_number`.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)(\..*)$")


def layer_names(model: torch.nn.Module) -> dict[str, str]:
    """This stage's parameter names -> the one-stage model's names."""
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    names = {}
    for name, _ in model.named_parameters():
        match = _LAYER.match(name)
        names[name] = f"{match[1]}{offsets[int(match[2])]}{match[3]}" if match else name
    return names


def one_stage_weights(model_cfg, vocab: int, tensor_parallel: int) -> dict[str, torch.Tensor]:
    """This rank's TP shard of every weight of the one-stage model (call with pipeline size 1, after
    seeding torch as the run being compared does before it builds its model)."""
    from nemo_rlp.models import build_model

    model = build_model(model_cfg, vocab, tensor_parallel, torch.device("cpu"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def load_one_stage_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the one-stage model's weights into this stage (the last stage's copy of tied word
    embeddings, `output_layer.weight`, takes the embedding)."""
    for name, global_name in layer_names(model).items():
        source = weights.get(global_name)
        if source is None and global_name == "output_layer.weight":
            source = weights["embedding.word_embeddings.weight"]
        dict(model.named_parameters())[name].copy_(source)


# The Mamba mixer's fused tensors hold [z, x, B, C, dt] (in_proj) / [x, B, C] (conv1d) per TP rank.
# (The conv's parameter names differ by megatron-core version: nemo_rlp.models.hybrid.provider.conv1d_names.)
_IN_PROJ, _CONV = "mixer.in_proj.weight", ("mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.conv1d_weight",
                                          "mixer.conv1d_bias")


def mixer_parts(model: torch.nn.Module) -> dict[str, dict[str, list[int]]]:
    """How each Mamba mixer's fused tensors split into parts on a TP rank, keyed by the one-stage
    model's layer name (`decoder.layers.N`); empty for a GPT."""
    parts = {}
    for layer in model.decoder.layers:
        mixer = getattr(layer, "mixer", None)
        if hasattr(mixer, "d_inner_local_tp"):
            d, gn, h = mixer.d_inner_local_tp, mixer.ngroups_local_tp * mixer.d_state, mixer.nheads_local_tp
            parts[f"decoder.layers.{layer.layer_number - 1}"] = {"in_proj": [d, d, gn, gn, h], "conv": [d, gn, gn]}
    return parts


def gather_tp(name: str, tensor: torch.Tensor, param: torch.Tensor, parts: dict | None = None) -> torch.Tensor:
    """The full (TP=1 layout) value of `tensor`: this rank's shard of `param` (its data or its grad),
    `name` its one-stage name. Replicated parameters come back as they are."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    world = torch.distributed.get_world_size(group)
    shards = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(shards, tensor.detach().contiguous(), group=group)
    if name.endswith(_IN_PROJ) or name.endswith(_CONV):
        sizes = (parts or {})[name.rsplit(".mixer.", 1)[0]]["in_proj" if name.endswith(_IN_PROJ) else "conv"]
        pieces = [shard.split(sizes, dim=0) for shard in shards]
        return torch.cat([pieces[r][k] for k in range(len(sizes)) for r in range(world)], dim=0)
    # A shard of a strided weight (the gated MLP's fc1: [gate, up]) holds `stride` blocks, one per
    # stride, which interleave rank by rank in the full weight. The mixer's own parameters shard
    # along dim 0.
    dim, stride = getattr(param, "partition_dim", 0), getattr(param, "partition_stride", 1)
    blocks = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([blocks[r][k] for k in range(stride) for r in range(world)], dim=dim)
