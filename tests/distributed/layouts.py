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
