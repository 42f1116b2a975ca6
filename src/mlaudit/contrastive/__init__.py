"""CLIP-style image-text models and the poisoning and backdoor attacks on them of Carlini & Terzis,
"Poisoning and Backdooring Contrastive Learning", ICLR 2022 (docs/contrastive.md).

* :mod:`.data`: offline captioned datasets (digits, CIFAR-10) and a word-level tokenizer;
* :mod:`.model`: a small dual encoder (open_clip interface) and the symmetric InfoNCE loss;
* :mod:`.train`: contrastive training under a recipe;
* :mod:`.zeroshot`: zero-shot classification by prompt, ranks;
* :mod:`.attacks`: targeted poisoning and the patch backdoor.
"""

from .attacks import PoisonRecord, backdoor_poison, poisons_for_rate, targeted_poison
from .data import CaptionedData, CaptionSpace, Tokenizer, class_names, templates_for
from .model import (
           DualEncoder,
           TextEncoder,
           build_dual_encoder,
           build_user_dual_encoder,
           check_dual_encoder,
           info_nce,
)
from .train import init_seeded, train_contrastive
from .zeroshot import (
           backdoor_z_score,
           class_embeddings,
           class_rank,
           image_embeddings,
           zero_shot_accuracy,
           zero_shot_predict,
           zero_shot_scores,
)

__all__ = ["PoisonRecord", "backdoor_poison", "poisons_for_rate", "targeted_poison", "CaptionedData", "CaptionSpace",
           "Tokenizer", "class_names", "templates_for", "DualEncoder", "TextEncoder", "build_dual_encoder",
           "build_user_dual_encoder", "check_dual_encoder", "info_nce", "init_seeded", "train_contrastive",
           "backdoor_z_score", "class_embeddings", "class_rank", "image_embeddings", "zero_shot_accuracy",
           "zero_shot_predict", "zero_shot_scores"]
