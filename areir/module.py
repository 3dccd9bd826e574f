"""AREIR as a `RetrievalModule`: meta-class cross-entropy per member for training, concatenated normalized member
logits (E*M dims, cosine similarity) for retrieval.

The meta-class assignment is a persistent buffer (`meta_labels`, int64 [E, C]) so it travels inside every
checkpoint and loads with ``torch.load(weights_only=True)``. Loading overwrites the seeded assignment with the
checkpoint's (the trained members only make sense with the partition they were trained on); a checkpoint whose
assignment has another shape, or is missing, raises instead of loading half a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from areir.meta_classes import build_assignment, count_collisions, is_balanced
from areir.model import AREIRNet, AREIRNetConfig, count_parameters
from irlab.losses import head_accuracy
from irlab.module import RetrievalModule
from irlab.optim import module_optimization
from irlab.plain import to_plain

log = logging.getLogger(__name__)
# cross_entropy: raw member logits (the NormSoftmax reference); normalized: s * unit logits vs one-hot targets, the
# loss of the randomized-ensembles 2018 code (cosine to fixed one-hot proxies, scale `loss_scale`)
MEMBER_LOSSES = ("cross_entropy", "normalized")


class AREIRModule(RetrievalModule):
    channels_last = True  # a CNN: NHWC convolutions on GPU (callbacks/gpu_layout.py)

    def __init__(
        self,
        num_classes: int,
        arch: str = AREIRNetConfig.arch,
        with_se: bool = AREIRNetConfig.with_se,
        pretrained: bool | str = AREIRNetConfig.pretrained,
        members: int = AREIRNetConfig.members,
        meta_classes: int = AREIRNetConfig.meta_classes,
        assignment: str = "random",
        assignment_seed: int = 0,
        member_impl: str = AREIRNetConfig.member_impl,
        random_weighting: bool = AREIRNetConfig.random_weighting,
        checkpoint_members: bool = AREIRNetConfig.checkpoint_members,
        pool_grid: int = AREIRNetConfig.pool_grid,
        member_width: int | None = AREIRNetConfig.member_width,
        member_loss: str = "cross_entropy",
        loss_scale: float = 16.0,
        channels_last: bool = False,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
    ) -> None:
        super().__init__()
        # plain Python values only: a checkpoint must load with torch.load(weights_only=True), which rejects the
        # OmegaConf containers Hydra passes for list arguments
        optimizer, scheduler = to_plain(optimizer), to_plain(scheduler)
        pretrained = pretrained if isinstance(pretrained, bool) else str(pretrained)
        self.save_hyperparameters()
        if num_classes is None or num_classes < 2:
            raise ValueError(f"num_classes must be the number of training classes (>= 2), got {num_classes}")
        labels = build_assignment(assignment, num_classes, meta_classes, members, assignment_seed)
        self.register_buffer("meta_labels", torch.as_tensor(labels, dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._check_loaded_assignment)
        if member_loss not in MEMBER_LOSSES:
            raise ValueError(f"model.member_loss must be one of {MEMBER_LOSSES}, got {member_loss!r}")
        self.net = AREIRNet(AREIRNetConfig(arch, members, meta_classes, with_se, pretrained, member_impl,
                                           random_weighting, checkpoint_members, pool_grid, member_width))
        self.log_assignment("seeded")
        self.meta_accuracy = head_accuracy(meta_classes)
        log.info(f"AREIR {arch}{'+SE' if with_se else ''} E={members} M={meta_classes} impl={member_impl}: "
                 f"{count_parameters(self.net):,} parameters")

    # ---- meta-class assignment ------------------------------------------------------------------------
    def log_assignment(self, source: str) -> int:
        """Log (and return) the number of class pairs sharing all E meta-labels: the ensemble cannot tell them apart."""
        collisions = count_collisions(self.meta_labels.cpu().numpy())
        c = self.meta_labels.shape[1]
        log.info(f"meta-class assignment ({source}, {self.hparams.assignment}): {collisions} of {c * (c - 1) // 2} "
                 f"class pairs share all {self.hparams.members} meta-labels")
        return collisions

    def _check_loaded_assignment(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "meta_labels"
        expected = tuple(self.meta_labels.shape)
        if key not in state_dict:
            raise ValueError(
                f"checkpoint has no meta-class assignment ({key}); it was not saved by this AREIR module, and the "
                f"members cannot be used with a freshly drawn partition. Use a checkpoint written by areir.module."
            )
        got = tuple(state_dict[key].shape)
        if got != expected:
            raise ValueError(
                f"checkpoint meta-class assignment has shape {got} (members x classes) but the config builds "
                f"{expected} (model.members={expected[0]}, {expected[1]} training classes). Evaluate with the "
                f"training run's settings (model.members={got[0]}, same dataset/protocol/val_fraction)."
            )
        if not is_balanced(state_dict[key].cpu().numpy(), self.hparams.meta_classes):
            raise ValueError(
                f"checkpoint meta-class assignment is not a balanced partition into model.meta_classes="
                f"{self.hparams.meta_classes} groups: was it trained with another model.meta_classes?"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        labels = checkpoint.get("state_dict", {}).get("meta_labels")
        if labels is not None:
            log.info(f"meta-class assignment restored from the checkpoint "
                     f"({count_collisions(labels.cpu().numpy())} colliding class pairs)")

    # ---- model --------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.trainer is not None and self.trainer.world_size > 1 and self.hparams.member_impl in ("loop", "vmap"):
            log.warning("DDP with member_impl != grouped: SyncBatchNorm only synchronises the stem and grouped "
                        "member BatchNorms; use model.member_impl=grouped for synchronised member statistics")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw meta-class logits [B, E, M]."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Each member's logits L2-normalised, concatenated: [B, E*M]; inner product = sum of member cosines."""
        return F.normalize(self(images).float(), dim=-1).flatten(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"]).float()  # [B, E, M]
        targets = self.meta_labels[:, batch["label"]].T  # [B, E]
        if self.hparams.member_loss == "normalized":  # the 2018 code: unit outputs against fixed one-hot targets
            logits = self.hparams.loss_scale * F.normalize(logits, dim=-1)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))  # = mean over members of member CE
        self.log("train/loss", loss, prog_bar=True)
        self.meta_accuracy(logits.detach().flatten(0, 1), targets.reshape(-1))  # every member's meta-class head
        self.log("train/meta_acc", self.meta_accuracy, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        """One group (the reference: Adam, rate x gamma at 50% and 70% of the epochs; conf/model/areir.yaml)."""
        return module_optimization(self, [{"params": self.parameters()}])
