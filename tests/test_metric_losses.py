"""Every loss preset (conf/model/loss/) computes exactly what pytorch-metric-learning computes when called
directly on the same batch, with the preset's settings and the same parameters; proxies train at their scale."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_metric_learning import losses, miners

from irlab.baseline import EmbeddingBaseline
from irlab.metric_losses import build_metric_loss
from tests.helpers import CONF, compose_config

PRESETS = sorted(p.stem for p in (CONF / "model" / "loss").glob("*.yaml"))
NUM_CLASSES, DIM = 6, 16


def loss_node(name: str) -> dict:
    return OmegaConf.to_container(compose_config([f"model/loss={name}"]).model.loss)


def direct_pml(node: dict, built) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """PML's own classes, built by hand from the preset's settings, holding the same parameters."""
    node = dict(node)
    miner_node, _ = node.pop("miner"), node.pop("lr_scale")
    target = node.pop("_target_")
    if target == "irlab.losses.NormalizedSoftmaxLoss":  # irlab's own: compare with PML's NormalizedSoftmaxLoss
        loss = losses.NormalizedSoftmaxLoss(NUM_CLASSES, DIM, **node)
        with torch.no_grad():
            loss.W.copy_(built.criterion.proxies.T)
        return loss, None
    cls = getattr(losses, target.rsplit(".", 1)[1])
    if "num_classes" in cls.__init__.__code__.co_varnames:
        node.update(num_classes=NUM_CLASSES, embedding_size=DIM)
    loss = cls(**node)
    loss.load_state_dict(built.criterion.state_dict())
    miner = None
    if miner_node:
        miner_node = dict(miner_node)
        miner = getattr(miners, miner_node.pop("_target_").rsplit(".", 1)[1])(**miner_node)
    return loss, miner


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_equals_pml_called_directly(name):
    torch.manual_seed(0)
    node = loss_node(name)
    built = build_metric_loss(node, NUM_CLASSES, DIM)
    loss, miner = direct_pml(node, built)
    embeddings = torch.randn(24, DIM, requires_grad=True)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(4)
    ours = built(embeddings, labels)
    theirs = loss(embeddings, labels, miner(embeddings, labels)) if miner else loss(embeddings, labels)
    assert torch.isfinite(ours) and ours.item() > 0
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    ours.backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_proxies_train_at_their_own_rate():
    class Run:
        estimated_stepping_batches, max_epochs = 10, 1

    cfg = compose_config(["model/loss=proxy_anchor"]).model
    model = EmbeddingBaseline(num_classes=NUM_CLASSES, arch="cnn_small", embedding_dim=DIM,
                              loss=OmegaConf.to_container(cfg.loss), optimizer=OmegaConf.to_container(cfg.optimizer),
                              scheduler=OmegaConf.to_container(cfg.scheduler))
    model.trainer = Run()  # what configure_optimizers reads
    opt = model.configure_optimizers()["optimizer"]
    base = cfg.optimizer.lr
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates[id(model.loss.proxies)] == pytest.approx(100 * base)
    assert rates[id(model.embedding.weight)] == pytest.approx(base)


def test_a_loss_node_without_a_target_says_which_key():
    from datamodules.errors import UserInputError

    with pytest.raises(UserInputError, match="model.loss needs a _target_"):
        build_metric_loss({"margin": 0.1}, NUM_CLASSES, DIM)


def test_the_done_when_commands_train_on_the_embedded_data(tmp_path):
    """`model/loss=proxy_anchor dataset.sampler=pk`, a timm trunk and ANN rows, as a user types them."""
    from irlab.runner import run

    metrics = run(compose_config(["debug=fast", "model/loss=proxy_anchor", "dataset.sampler=pk",
                                  "model.arch=timm/resnet18", "evaluation.indexes=[ivfpq,hnsw]"],
                                 output_dir=tmp_path))
    assert 0.0 <= metrics["test/R@1"] <= 1.0 and "test/ivfpq/R@1" in metrics and "test/hnsw/R@1" in metrics
    assert 0.0 <= metrics["train/accuracy"] <= 1.0  # the nearest proxy's class


def test_class_scores_are_higher_for_the_right_class_whatever_the_distance():
    """Head accuracy reads PML's get_logits: similarities as they are, distances negated (ProxyNCA: Lp)."""
    from irlab.losses import class_logits

    for node in (loss_node("proxy_nca"), loss_node("proxy_anchor"), loss_node("arcface")):
        built = build_metric_loss(node, NUM_CLASSES, DIM)
        proxies = dict(built.criterion.named_parameters())
        weights = next(iter(proxies.values())).detach()
        centres = weights if weights.shape == (NUM_CLASSES, DIM) else weights.T  # PML's W is [dim, classes]
        scores = class_logits(built.criterion, centres)
        assert (scores.argmax(dim=1) == torch.arange(NUM_CLASSES)).all(), node["_target_"]
    assert class_logits(build_metric_loss(loss_node("triplet"), NUM_CLASSES, DIM).criterion, torch.zeros(2, DIM)) \
        is None
