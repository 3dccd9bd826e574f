"""Any timm model as an IRGen image encoder (``irgen.tokenizer.encoder.arch=timm/<name>``), and the wrapper the
CLIP encoder (`irgen.clip_weights`) is built on.

Tokens: a transformer's output tokens with its class token first (a model without one gets the mean of its
tokens prepended as the global token); a CNN's feature-map cells with their mean prepended, as the torchvision
ResNet encoder does. ``output="transformer"`` drops the model's final norm (CLIP's ``ln_post``): the IRGen
reference's tokens. The model's classifier head is applied to every token only when ``project`` is set (CLIP's
``proj``); for ``timm/<name>`` the model is built without one (``num_classes=0``).
"""

from __future__ import annotations

import torch
from torch import nn

from irgen.encoder_base import ImageEncoder
from irlab.backbones import TIMM_PREFIX, build_timm
from irlab.checkpoints import CheckpointError

PRETRAINED_KEY = "irgen.tokenizer.encoder.pretrained"


class TimmTokens(ImageEncoder):
    def __init__(self, model: nn.Module, project: bool = False, output: str = "projected") -> None:
        super().__init__()
        if output == "transformer":
            # no final norm: parameters without gradients stop DDP (find_unused_parameters=False), so the layer
            # is removed rather than skipped
            model.norm = nn.Identity()
        self.model, self.project = model, project
        self.dim = int(model.num_classes) if project else int(model.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(images)
        if x.ndim == 4:  # a CNN's map: NCHW, or NHWC for the models that say so
            cells = x.flatten(1, 2) if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else \
                x.flatten(2).transpose(1, 2)
            x = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)
        elif getattr(self.model, "num_prefix_tokens", 0) == 0:
            x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return self.model.head(x) if self.project else x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if any(k.startswith(prefix + "vit.") for k in state_dict):
            raise CheckpointError("this checkpoint's CLIP encoder was written by an irlab version that converted CLIP "
                                  "to torchvision layers (keys vit.*); the encoder is timm's now. Rebuild the IRGen "
                                  "stages with irgen.rebuild=true")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_timm_encoder(arch: str, image_size: int, pretrained: bool | str, output: str) -> TimmTokens:
    """``timm/<name>``: timm's model without a classifier; its weights as `irlab.backbones.build_timm` gets them.
    Models built for one input size (vision transformers: their position embedding) are built for this run's."""
    name = arch.removeprefix(TIMM_PREFIX)
    try:
        model = build_timm(name, pretrained, config_key=PRETRAINED_KEY, num_classes=0, img_size=image_size)
    except TypeError:  # a model with no fixed input size (CNNs) takes no img_size
        model = build_timm(name, pretrained, config_key=PRETRAINED_KEY, num_classes=0)
    return TimmTokens(model, output=output)
