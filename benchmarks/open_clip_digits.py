"""A user's open_clip model for the ``contrastive`` kind (issue 18: "use open_clip_torch model code; a user can plug
a pretrained CLIP they have on disk"), as ``encoder: {dual: open_clip_digits:OpenClipDigits, tokenizer:
open_clip_digits:tokenize}`` with ``benchmarks/`` on the path (benchmarks/contrastive_open_clip.py runs it).

``OpenClipDigits`` is open_clip's own ``CLIP`` class (a ViT image tower and its text transformer, open_clip's BPE
vocabulary of 49,408 tokens), sized for 8x8 digits, behind the two lines of glue the kind needs: grey images
repeated to 3 channels and normalised with CLIP's mean and std. Its weights come from the file named by
``MLAUDIT_OPENCLIP_WEIGHTS`` (``torch.load(..., weights_only=True)``; the sha256 in ``MLAUDIT_OPENCLIP_SHA256`` is
checked when set), as a pretrained CLIP on disk would; without it the model starts at open_clip's initialisation.
"""

from __future__ import annotations

import hashlib
import os

import torch
from _common import import_torchvision_models_only
from torch import Tensor, nn

import_torchvision_models_only()  # open_clip imports torchvision; its models use none of the C++ operators
import open_clip  # noqa: E402

CONTEXT = 16
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (open_clip.OPENAI_DATASET_MEAN / STD)
STD = (0.26862954, 0.26130258, 0.27577711)
_TOKENIZER = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)


def tokenize(captions: list[str]) -> Tensor:
    """open_clip's BPE tokenizer at context length 16: [N, 16] long."""
    return _TOKENIZER(list(captions))


class OpenClipDigits(nn.Module):
    """open_clip ``CLIP`` (ViT, 2 layers of width 64, patch 2, on 8x8 images; text transformer, 2 layers of width 64)
    with open_clip's interface: ``encode_image``, ``encode_text``, ``logit_scale``."""

    def __init__(self, embed_dim: int = 64) -> None:
        super().__init__()
        self.clip = open_clip.CLIP(embed_dim=embed_dim,
                                   vision_cfg={"image_size": 8, "layers": 2, "width": 64, "patch_size": 2, "head_width": 32},
                                   text_cfg={"context_length": CONTEXT, "vocab_size": _TOKENIZER.vocab_size, "width": 64,
                                             "heads": 2, "layers": 2})
        path = os.environ.get("MLAUDIT_OPENCLIP_WEIGHTS")
        if path:
            want = os.environ.get("MLAUDIT_OPENCLIP_SHA256")
            if want and hashlib.sha256(open(path, "rb").read()).hexdigest() != want:
                raise ValueError(f"{path}: sha256 differs from MLAUDIT_OPENCLIP_SHA256")
            self.clip.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.logit_scale = self.clip.logit_scale
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.clip.encode_image((x - self.mean) / self.std, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)
