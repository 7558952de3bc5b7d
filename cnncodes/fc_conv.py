"""Fully connected layers run as convolutions, so AlexNet and VGG16 give maps of fc codes.

AlexNet's ``fc6`` sees pool5's 256x6x6 volume, so it equals a 6x6 convolution without padding
(its 4096x9216 weights reshaped to 4096x256x6x6, in the (channel, row, column) order that
``torch.flatten`` uses); ``fc7`` and ``fc8`` are then 1x1 convolutions. VGG16 likewise with
512x7x7. On a 224 px input the converted network computes the same numbers as the original
(tested); on a larger input it slides the whole classifier over the image in one forward pass
and each fc layer becomes a map (AlexNet: 384 px -> 6x6, 448 px -> 8x8).

torchvision's AlexNet and VGG average-pool the last conv map to 6x6 / 7x7 before the
classifier (``avgpool``, an identity at 224 px); the converted network has no such pooling,
since it would undo the sliding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from .errors import InvalidParameterError

__all__ = ["FC_AS_CONV_BACKBONES", "with_fc_as_conv", "with_input_size", "fc_to_conv"]

#: Backbones whose classifier is ``features -> avgpool -> flatten -> Sequential(Linear...)``.
FC_AS_CONV_BACKBONES = ("alexnet", "vgg16")


def with_fc_as_conv(spec):
    """``spec`` with its fully connected layers run as convolutions (their codes become maps).

    Raises
    ------
    InvalidParameterError
        For a backbone other than :data:`FC_AS_CONV_BACKBONES`.
    """
    if spec.name not in FC_AS_CONV_BACKBONES:
        raise InvalidParameterError(
            "fc_as_conv", "extract",
            f"is defined for {', '.join(FC_AS_CONV_BACKBONES)} only (fully connected layers on a fixed conv "
            f"volume); backbone {spec.name!r} has no such head. Larger inputs work without it for globally "
            f"pooled networks: set input_size alone."
        )
    layers = {
        alias: dataclasses.replace(ld, kind="map", description=ld.description + " (map: fc run as a convolution)")
        if ld.node.startswith("classifier.") else ld
        for alias, ld in spec.layers.items()
    }
    return dataclasses.replace(spec, layers=layers, arch_args={**spec.arch_args, "fc_as_conv": True},
                               convert=fc_to_conv)


def with_input_size(spec, size: int):
    """``spec`` fed ``size`` px crops: the shorter side resized to ``size`` x resize/crop of the
    backbone's preprocessing (256/224 for most), then the centre ``size`` square kept, so
    ``size`` = the default crop is exactly the default preprocessing."""
    pre = spec.preprocessing
    if size == pre.crop:
        return spec
    resize = int(round(size * pre.resize / pre.crop))
    return dataclasses.replace(spec, preprocessing=dataclasses.replace(pre, resize=resize, crop=int(size)))


def fc_to_conv(model):
    """The network of ``model`` (AlexNet / VGG layout) with every ``Linear`` of its classifier
    turned into a convolution holding the same weights (shared storage, no copy).

    The classifier keeps its module indices, so layer nodes such as ``classifier.5`` still name
    the same layers.
    """
    import torch.nn as nn

    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    channels = convs[-1].out_channels
    head, first = [], True
    for m in model.classifier:
        if not isinstance(m, nn.Linear):
            head.append(m)
            continue
        if first:
            k = math.isqrt(m.in_features // channels)
            if channels * k * k != m.in_features:
                raise ValueError(f"{m.in_features} inputs are not {channels} channels on a square grid")
            shape, first = (m.out_features, channels, k, k), False
        else:
            shape = (m.out_features, m.in_features, 1, 1)
        conv = nn.Conv2d(shape[1], shape[0], shape[2], device="meta")  # no random init to overwrite
        conv.weight = nn.Parameter(m.weight.detach().reshape(shape), requires_grad=m.weight.requires_grad)
        conv.bias = nn.Parameter(m.bias.detach(), requires_grad=m.bias.requires_grad)
        head.append(conv)
    return _FCConvNet(model.features, nn.Sequential(*head))


@functools.cache
def _fc_conv_net_class():
    import torch.nn as nn

    class FCConvNet(nn.Module):
        """``features`` then the convolutional classifier: no adaptive pooling, no flattening."""

        def __init__(self, features, classifier):
            super().__init__()
            self.features = features
            self.classifier = classifier

        def forward(self, x):
            return self.classifier(self.features(x))

    return FCConvNet


def _FCConvNet(features, classifier):
    return _fc_conv_net_class()(features, classifier)
