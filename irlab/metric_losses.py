"""An embedding model's loss from its ``model.loss`` node (conf/model/loss/): pytorch-metric-learning's losses
and miners, or irlab's normalized softmax (the default, `irlab.losses`).

A node is the loss class (``_target_``) and its settings, plus two keys irlab reads itself: ``miner`` (a PML
miner node or null: which pairs or triplets of the batch the loss sees) and ``lr_scale`` (the learning rate of
the loss's own parameters, proxies or class weights, as a multiple of ``optimizer.lr``: ProxyAnchor trains its
proxies at 100x). Losses that learn one vector per class (``num_classes`` in their signature) get the number
of training classes and the embedding size filled in.

PML is used as is: the loss and miner objects are PML's, called as PML documents them, so a loss's value in
irlab is PML's (a test compares every preset with PML called directly).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import hydra
import torch
from torch import nn

from datamodules.errors import UserInputError

IRLAB_KEYS = ("miner", "lr_scale")
# the loss used when a model is built without a loss node (tests, notebooks): the default of conf/model/baseline.yaml
DEFAULT_LOSS = {"_target_": "irlab.losses.NormalizedSoftmaxLoss", "temperature": 0.05, "lr_scale": 1.0,
                "miner": None}


@dataclass
class MetricLoss:
    """The built criterion (an `nn.Module`, parameters included), its miner and its parameters' rate scale."""

    criterion: nn.Module
    miner: nn.Module | None
    lr_scale: float

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.miner is None:
            return self.criterion(embeddings, labels)
        return self.criterion(embeddings, labels, self.miner(embeddings, labels))


def build_metric_loss(node: Mapping | None, num_classes: int, embedding_size: int) -> MetricLoss:
    """The loss of a ``model.loss`` node (`DEFAULT_LOSS` when None) for `num_classes` training classes."""
    node = dict(DEFAULT_LOSS if node is None else node)
    if "_target_" not in node:
        raise UserInputError(f"model.loss needs a _target_ (a loss class), got keys {sorted(node)}; pick a preset "
                             f"with model/loss=<name> (conf/model/loss/)")
    miner, lr_scale = node.pop("miner", None), float(node.pop("lr_scale", 1.0))
    params = inspect.signature(hydra.utils.get_class(node["_target_"]).__init__).parameters
    if "num_classes" in params:
        node["num_classes"] = num_classes
    for size_key in ("embedding_size", "dim"):
        if size_key in params:
            node[size_key] = embedding_size
    criterion = hydra.utils.instantiate(node)
    return MetricLoss(criterion, hydra.utils.instantiate(miner) if miner else None, lr_scale)
