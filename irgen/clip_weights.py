"""OpenAI CLIP / open_clip visual towers for IRGen (the paper's feature encoder), built by timm.

timm's ``vit_base_patch16_clip_quickgelu_224`` is CLIP's ViT exactly (QuickGELU, ``ln_pre``, ``ln_post``,
the bias-free ``proj`` as its head), and its checkpoint filter reads OpenAI's key layout: with the same weights
it gives the same features as an independent re-implementation of CLIP's forward (a test compares them), so
irlab keeps no conversion of its own. What stays here is what timm does not do:

* reading OpenAI's released ``ViT-B-16.pt``, a TorchScript archive (``torch.jit.load``, which deserializes
  TorchScript code and tensors, never arbitrary pickled Python objects; only the tensors are kept), and plain
  state dicts (``visual.*`` keys of a full CLIP or open_clip model, or the bare tower, optionally under
  ``state_dict``/``module.``) with ``torch.load(weights_only=True)``;
* the activation. OpenAI's CLIP uses QuickGELU; open_clip's LAION and DataComp ViT-B/16 use GELU, and loading
  them into the QuickGELU model computes another function without an error. ``clip_activation: auto`` takes
  QuickGELU for OpenAI's archive and for random initialisation, and refuses any other file, whose activation
  cannot be known: set ``quick_gelu`` or ``gelu``;
* ``clip_output``: ``projected`` tokens (after ``ln_post`` and ``proj``: CLIP's embedding space) or
  ``transformer`` tokens (the last block's output, as the IRGen reference uses them; ``ln_post`` and ``proj``
  are not built at all).

``pretrained: true`` downloads timm's ``vit_base_patch16_clip_quickgelu_224.openai`` (GELU:
``vit_base_patch16_clip_224.laion2b``) from the Hugging Face hub.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from datamodules.errors import MissingFileError, UserInputError
from irgen.timm_encoder import PRETRAINED_KEY, TimmTokens
from irlab.backbones import build_timm
from irlab.checkpoints import read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_URLS = {
    "clip_vit_b_16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}


@dataclass(frozen=True)
class CLIPSpec:
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    output_dim: int | None  # None: no projection in the checkpoint
    grid: int  # patches per side the positional embedding was trained for


CLIP_SPECS = {"clip_vit_b_16": CLIPSpec(16, 768, 12, 12, 3072, 512, 14)}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1].startswith("code/") for name in zf.namelist())


def read_clip_visual(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual tower's tensors from a local checkpoint file: CLIP key names (no ``visual.`` prefix), or
    timm's own layout (``cls_token``, ``blocks.*``: timm's ``model.safetensors``) as it is."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"CLIP checkpoint not found: {path}. Download e.g. {CLIP_URLS['clip_vit_b_16']} "
                                f"and set irgen.tokenizer.encoder.pretrained=/path/to/ViT-B-16.pt")
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated but remains the only reader of these archives
            warnings.simplefilter("ignore", FutureWarning)
            state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        state = read_state_dict(path, "pretrained weights file")
    if is_timm_layout(state):
        return state
    return extract_visual(state, source=str(path))


def is_timm_layout(state: dict[str, torch.Tensor]) -> bool:
    return "cls_token" in state and "patch_embed.proj.weight" in state


def extract_visual(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Strip wrappers (``module.``, ``model.``) and keep the ``visual.*`` tower (or a bare visual state dict)."""
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    if any(k.startswith("visual.trunk.") for k in state):
        raise ValueError(f"{source}: an open_clip model with a timm trunk (visual.trunk.*) is not supported; use an "
                         f"OpenAI-architecture CLIP (ViT-B-16 'openai' or 'laion' weights)")
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not visual and "conv1.weight" in state:
        visual = dict(state)
    if "conv1.weight" not in visual or "class_embedding" not in visual:
        sample = sorted(state)[:5]
        raise ValueError(f"{source} is not a CLIP ViT checkpoint: expected visual.conv1.weight and "
                         f"visual.class_embedding, found keys like {sample}")
    if any(".ls_1." in k or ".ls_2." in k for k in visual):
        raise ValueError(f"{source}: layer-scale CLIP variants (ls_1/ls_2) are not supported")
    return visual


def spec_from_state(visual: dict[str, torch.Tensor]) -> CLIPSpec:
    if is_timm_layout(visual):
        width, _, patch, _ = visual["patch_embed.proj.weight"].shape
        head = visual.get("head.weight")
        return CLIPSpec(patch_size=patch, width=width, heads=max(1, width // 64),
                        layers=1 + max(int(k.split(".")[1]) for k in visual if k.startswith("blocks.")),
                        mlp_dim=visual["blocks.0.mlp.fc1.weight"].shape[0],
                        output_dim=None if head is None else head.shape[0],
                        grid=math.isqrt(visual["pos_embed"].shape[1] - 1))
    width, _, patch, _ = visual["conv1.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in visual if k.startswith("transformer.resblocks."))
    grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
    proj = visual.get("proj")
    return CLIPSpec(patch_size=patch, width=width, layers=layers, heads=max(1, width // 64),
                    mlp_dim=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                    output_dim=None if proj is None else proj.shape[1], grid=grid)


ACTIVATIONS = ("auto", "quick_gelu", "gelu")
# timm's CLIP ViT for each activation, and the weights `pretrained: true` downloads for it
TIMM_CLIP = {"quick_gelu": ("vit_base_patch16_clip_quickgelu_224", "openai"),
             "gelu": ("vit_base_patch16_clip_224", "laion2b")}
ACTIVATION_KEY = "irgen.tokenizer.encoder.clip_activation"


def timm_clip(spec: CLIPSpec, image_size: int, activation: str, output: str) -> nn.Module:
    """timm's CLIP ViT of `spec` at `image_size`, random weights; its head is CLIP's ``proj`` (projected only)."""
    import timm

    if image_size % spec.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the CLIP patch size {spec.patch_size}")
    name, _ = TIMM_CLIP[activation]
    head = spec.output_dim if output == "projected" and spec.output_dim else 0
    model = timm.create_model(name, pretrained=False, img_size=image_size, patch_size=spec.patch_size,
                              embed_dim=spec.width, depth=spec.layers, num_heads=spec.heads,
                              mlp_ratio=spec.mlp_dim / spec.width, num_classes=head)
    if output == "transformer":  # no ln_post (and no head above): the reference's tokens
        model.norm = nn.Identity()
    return model


def file_activation(path: Path, activation: str) -> str:
    """The activation of the CLIP weights in `path`: as set, or QuickGELU for OpenAI's TorchScript release."""
    if activation != "auto":
        return activation
    if _is_torchscript(path):
        return "quick_gelu"
    raise UserInputError(f"{path}: a CLIP state dict whose activation cannot be known (OpenAI's weights use "
                         f"QuickGELU, open_clip's LAION and DataComp ViT-B/16 GELU; loading one into the other "
                         f"computes another function). Set {ACTIVATION_KEY}=quick_gelu or gelu")


def build_clip_encoder(arch: str, image_size: int = 224, pretrained: bool | str = False, output: str = "projected",
                       activation: str = "auto") -> TimmTokens:
    """``clip_vit_b_16`` (random init, timm's download or a local file) or ``clip`` (the architecture read from
    the local file)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if activation not in ACTIVATIONS:
        raise UserInputError(f"{ACTIVATION_KEY} must be one of {ACTIVATIONS}, got {activation!r}")
    if pretrained is True or pretrained == "true":
        if arch not in CLIP_SPECS:
            raise UserInputError(f"arch={arch} reads its architecture from a local file: set {PRETRAINED_KEY}=/path/"
                                 f"to/clip.pt (or use clip_vit_b_16)")
        name, tag = TIMM_CLIP["quick_gelu" if activation == "auto" else activation]
        head = CLIP_SPECS[arch].output_dim if output == "projected" else 0
        model = build_timm(f"{name}.{tag}", True, config_key=PRETRAINED_KEY, img_size=image_size, num_classes=head)
        return TimmTokens(model, project=bool(head), output=output)
    if not pretrained or pretrained == "false":
        if arch not in CLIP_SPECS:
            raise ValueError(f"arch={arch} reads its architecture from the checkpoint: set "
                             f"{PRETRAINED_KEY}=/path/to/clip.pt (or use clip_vit_b_16)")
        spec = CLIP_SPECS[arch]
        model = timm_clip(spec, image_size, "quick_gelu" if activation == "auto" else activation, output)
        return TimmTokens(model, project=output == "projected" and spec.output_dim is not None, output=output)
    path = Path(pretrained).expanduser()
    visual = read_clip_visual(path)
    spec = spec_from_state(visual)
    if arch in CLIP_SPECS:
        want = CLIP_SPECS[arch]
        if (spec.patch_size, spec.width, spec.layers) != (want.patch_size, want.width, want.layers):
            raise ValueError(f"{pretrained} holds a CLIP ViT with patch {spec.patch_size}, width {spec.width}, "
                             f"{spec.layers} layers, not {arch}; use irgen.tokenizer.encoder.arch=clip to take the "
                             f"file's")
    model = timm_clip(spec, image_size, file_activation(path, activation), output)
    layout = visual if is_timm_layout(visual) else {f"visual.{k}": v for k, v in visual.items()}
    state = checkpoint_filter_fn({k: v.float() for k, v in layout.items()}, model)
    if output == "transformer":  # ln_post and proj are not built for the reference's tokens
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{pretrained}: CLIP weights do not fit timm's model, missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    return TimmTokens(model, project=output == "projected" and spec.output_dim is not None, output=output)
