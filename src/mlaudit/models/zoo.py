"""Registers every architecture: importing this module imports each zoo module, whose
``@register_model`` decorators fill :data:`mlaudit.models.registry.MODELS`.

Architectures: ``resnet18``, ``convnet6``, ``vgg11``, ``mobilenetv2``, ``fastcnn``, ``airbench``, ``tanhcnn`` (image models) and
``mlp``, ``logistic`` (any input shape); ``scatter-linear``, ``scatter-cnn`` (fixed wavelet scattering
features + a trainable head, Tramèr & Boneh 2021).
"""

from __future__ import annotations

from . import airbench, convnet, fastcnn, mlp, mobilenet, resnet, scatternet, tanhcnn, vgg

__all__ = ["airbench", "convnet", "fastcnn", "mlp", "mobilenet", "resnet", "scatternet", "tanhcnn", "vgg"]
