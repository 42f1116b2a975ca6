"""Registers every architecture: importing this module imports each zoo module, whose
``@register_model`` decorators fill :data:`mlaudit.models.registry.MODELS`.

Architectures: ``resnet18``, ``convnet6``, ``vgg11``, ``mobilenetv2``, ``fastcnn``, ``airbench`` (image models) and
``mlp``, ``logistic`` (any input shape).
"""

from __future__ import annotations

from . import airbench, convnet, fastcnn, mlp, mobilenet, resnet, vgg

__all__ = ["airbench", "convnet", "fastcnn", "mlp", "mobilenet", "resnet", "vgg"]
