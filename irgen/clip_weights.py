"""OpenAI CLIP / open_clip visual towers as torchvision ViTs (the IRGen paper's feature encoder).

CLIP's ViT differs from torchvision's in three places, each reproduced here so that the converted model
computes exactly CLIP's function:

* ``ln_pre``: a LayerNorm after the positional embedding. torchvision's encoder applies ``encoder.dropout``
  at exactly that point, so the LayerNorm takes the dropout's slot (dropout is 0 in torchvision anyway).
* QuickGELU (``x * sigmoid(1.702 x)``) instead of GELU in every MLP: the activation module is swapped.
* ``proj``: a bias-free projection after ``ln_post`` (torchvision's final ``encoder.ln``), applied to every
  token, so the global token is CLIP's image embedding. LayerNorms use CLIP's eps 1e-5 (torchvision: 1e-6).

Key mapping: conv1 -> conv_proj (bias zero), class_embedding -> class_token, positional_embedding ->
encoder.pos_embedding (bicubically resized when the image size differs), ln_pre -> encoder.dropout,
transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj} ->
encoder.layers.encoder_layer_i.{ln_1, self_attention.in_proj_*, self_attention.out_proj, ln_2, mlp.0, mlp.3},
ln_post -> encoder.ln, proj -> proj.weight (transposed).

Files: a plain state dict (``visual.*`` keys of a full CLIP or open_clip model, or the bare visual tower,
optionally under ``state_dict``/``module.``) is read with ``torch.load(weights_only=True)``. OpenAI's released
``ViT-B-16.pt`` is a TorchScript archive: it is opened with ``torch.jit.load`` (which deserializes TorchScript
code and tensors, never arbitrary pickled Python objects) and only its tensors are kept.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from datamodules.errors import MissingFileError
from irgen.encoder_base import ImageEncoder
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


# what ``output="transformer"`` leaves out of the model: CLIP's ln_post and proj (converted key names)
UNUSED_BY_TRANSFORMER_OUTPUT = ("vit.encoder.ln.", "proj.")


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x) (not the same function as GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1].startswith("code/") for name in zf.namelist())


def read_clip_visual(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual tower's tensors (CLIP key names, no ``visual.`` prefix) from a local checkpoint file."""
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
    return extract_visual(state, source=str(path))


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
    width, _, patch, _ = visual["conv1.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in visual if k.startswith("transformer.resblocks."))
    grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
    proj = visual.get("proj")
    return CLIPSpec(patch_size=patch, width=width, layers=layers, heads=max(1, width // 64),
                    mlp_dim=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                    output_dim=None if proj is None else proj.shape[1], grid=grid)


def resize_pos_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, w] -> [1 + grid*grid, w], bicubic on the patch grid (class position unchanged)."""
    old = math.isqrt(pos.shape[0] - 1)
    if old == grid:
        return pos
    cells = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], cells.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)])


def convert_clip_visual(visual: dict[str, torch.Tensor], grid: int | None = None) -> dict[str, torch.Tensor]:
    """CLIP visual keys -> `CLIPViTEncoder` keys (torchvision ViT under ``vit.``, projection under ``proj.``)."""
    v = {k: t.float() for k, t in visual.items()}
    spec = spec_from_state(v)
    pos = resize_pos_embedding(v["positional_embedding"], grid or spec.grid)
    out = {
        "vit.conv_proj.weight": v["conv1.weight"],
        "vit.conv_proj.bias": torch.zeros(spec.width),
        "vit.class_token": v["class_embedding"].reshape(1, 1, -1),
        "vit.encoder.pos_embedding": pos[None],
        "vit.encoder.dropout.weight": v["ln_pre.weight"],
        "vit.encoder.dropout.bias": v["ln_pre.bias"],
        "vit.encoder.ln.weight": v["ln_post.weight"],
        "vit.encoder.ln.bias": v["ln_post.bias"],
    }
    names = {"ln_1": "ln_1", "attn.in_proj_weight": "self_attention.in_proj_weight",
             "attn.in_proj_bias": "self_attention.in_proj_bias", "attn.out_proj": "self_attention.out_proj",
             "ln_2": "ln_2", "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.3"}
    for i in range(spec.layers):
        src, dst = f"transformer.resblocks.{i}.", f"vit.encoder.layers.encoder_layer_{i}."
        for key, tensor in v.items():
            if not key.startswith(src):
                continue
            rest = key[len(src):]
            for a, b in names.items():
                if rest == a or rest.startswith(a + "."):
                    out[dst + b + rest[len(a):]] = tensor
                    break
            else:
                raise ValueError(f"unexpected CLIP tensor {key}")
    if spec.output_dim is not None:
        out["proj.weight"] = v["proj"].T.contiguous()
    return out


class CLIPViTEncoder(ImageEncoder):
    """CLIP's visual transformer built from torchvision parts; tokens projected to CLIP's embedding space."""

    def __init__(self, spec: CLIPSpec, image_size: int, output: str = "projected") -> None:
        super().__init__()
        self.output = output
        if image_size % spec.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the CLIP patch size {spec.patch_size}")
        self.spec = spec
        self.vit = VisionTransformer(image_size, spec.patch_size, spec.layers, spec.heads, spec.width, spec.mlp_dim,
                                     norm_layer=nn.LayerNorm)
        self.vit.encoder.dropout = nn.LayerNorm(spec.width)  # ln_pre sits where torchvision applies dropout
        for layer in self.vit.encoder.layers:
            layer.mlp[1] = QuickGELU()
        self.vit.heads = nn.Identity()
        if output == "transformer":
            # the reference's tokens: no ln_post, no projection. They are not built at all: parameters without
            # gradients stop DDP (find_unused_parameters=False) at its second step
            self.vit.encoder.ln = nn.Identity()
            self.proj = nn.Identity()
        else:
            self.proj = nn.Identity() if spec.output_dim is None else nn.Linear(spec.width, spec.output_dim,
                                                                                 bias=False)
        self.dim = spec.output_dim or spec.width if output == "projected" else spec.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit._process_input(images)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.proj(self.vit.encoder(torch.cat([cls, x], dim=1)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.output == "transformer":  # CLIP files and older checkpoints hold the layers this output skips
            for key in [k for k in state_dict if k.startswith(tuple(prefix + u for u in UNUSED_BY_TRANSFORMER_OUTPUT))]:
                state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_clip_encoder(arch: str, image_size: int = 224, pretrained: bool | str = False,
                       output: str = "projected") -> CLIPViTEncoder:
    """``clip_vit_b_16`` (random init or a local file) or ``clip`` (architecture read from the local file)."""
    if pretrained is True or pretrained == "true":
        url = CLIP_URLS.get(arch, CLIP_URLS["clip_vit_b_16"])
        raise ValueError(f"CLIP weights are never downloaded implicitly: fetch {url} on a machine with network and "
                         f"set irgen.tokenizer.encoder.pretrained=/path/to/ViT-B-16.pt")
    if not pretrained or pretrained == "false":
        if arch not in CLIP_SPECS:
            raise ValueError(f"arch={arch} reads its architecture from the checkpoint: set "
                             f"irgen.tokenizer.encoder.pretrained=/path/to/clip.pt (or use clip_vit_b_16)")
        return CLIPViTEncoder(CLIP_SPECS[arch], image_size, output)
    visual = read_clip_visual(pretrained)
    spec = spec_from_state(visual)
    if arch in CLIP_SPECS:
        want = CLIP_SPECS[arch]
        if (spec.patch_size, spec.width, spec.layers) != (want.patch_size, want.width, want.layers):
            raise ValueError(f"{pretrained} holds a CLIP ViT with patch {spec.patch_size}, width {spec.width}, "
                             f"{spec.layers} layers, not {arch}; use irgen.tokenizer.encoder.arch=clip to take the "
                             f"file's")
    encoder = CLIPViTEncoder(spec, image_size, output)
    state = convert_clip_visual(visual, grid=image_size // spec.patch_size)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{pretrained}: CLIP conversion mismatch, missing {missing[:4]}, unexpected {unexpected[:4]}")
    return encoder
