"""CIFAR model zoo with named KD feature taps.

``create(name, num_classes=10, **kwargs)`` builds any registered model; ``list_models()`` lists
the exact names, canonical examples and the parsed name patterns:

* ``resnet18`` (CIFAR ResNet18), ``resnet_tiny`` (ResNet18-shaped, for tests), ``alexnet``;
* ``wrn_<depth>_<width>`` (``dropout=``), ``preresnet<depth>`` and ``pyramidnet_<depth>_<alpha>``
  (``block="basic"|"bottleneck"``).

Every model declares ``kd_taps`` / ``kd_embedding`` (see :mod:`rolekd.models.taps`); use
:class:`FeatureTaps` to read features, embedding and logits in one forward pass.
"""

from rolekd.models.registry import create, list_models, on_meta, register_family, register_model
from rolekd.models.taps import FeatureTaps, Outputs, TappedNet

# Importing the families registers them.
from rolekd.models import alexnet as _alexnet  # noqa: E402,F401
from rolekd.models import preresnet as _preresnet  # noqa: E402,F401
from rolekd.models import pyramidnet as _pyramidnet  # noqa: E402,F401
from rolekd.models import resnet as _resnet  # noqa: E402,F401
from rolekd.models import wrn as _wrn  # noqa: E402,F401

__all__ = ["create", "list_models", "on_meta", "register_model", "register_family", "FeatureTaps", "Outputs",
           "TappedNet"]
