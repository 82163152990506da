"""The PyTorch FCN that fcn-jax mirrors and is tested against (see docs/reference-fcn.md): torchvision's
VGG ``features`` as the backbone and the FCN32s/FCN16s/FCN8s/FCNs decoders of five ``ConvTranspose2d`` +
BatchNorm steps, NCHW, with the state_dict layout ``pretrained_net.features.N.*``, ``deconvK.*``,
``bnK.*``, ``classifier.*``. Inputs must be multiples of 32."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torchvision import models
from torchvision.models.vgg import VGG, make_layers

from fcn_jax.errors import ConfigError
from fcn_jax.models.fcn import DECODER_WIDTHS
from fcn_jax.models.vgg import check_backbone_name, feature_ranges


class VGGNet(VGG):
    """torchvision's VGG with the classifier removed; ``forward`` returns ``{"x1": .., "x5": ..}``,
    the outputs of the five ``ranges`` of ``features`` (each ends right after a max-pool)."""

    def __init__(self, backbone: str = "vgg16", batch_norm: bool = False, pretrained: bool = False,
                 requires_grad: bool = True, remove_fc: bool = True):
        super().__init__(make_layers(list(check_backbone_name(backbone)), batch_norm=batch_norm))
        self.ranges = feature_ranges(backbone, batch_norm)
        if pretrained:  # downloads torchvision's ImageNet weights (needs the network)
            name = backbone + ("_bn" if batch_norm else "")
            self.load_state_dict(models.get_model_weights(name).DEFAULT.get_state_dict(progress=True))
        if not requires_grad:
            for p in self.parameters():
                p.requires_grad_(False)
        if remove_fc:
            del self.classifier

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for idx, (start, end) in enumerate(self.ranges, start=1):
            for layer in range(start, end):
                x = self.features[layer](x)
            out[f"x{idx}"] = x
        return out


class _FCNDecoder(nn.Module):
    """The layers shared by all four decoders; subclasses define ``forward``."""

    def __init__(self, pretrained_net: VGGNet, n_class: int):
        super().__init__()
        self.n_class = n_class
        self.pretrained_net = pretrained_net
        self.relu = nn.ReLU(inplace=True)
        for k, (cin, cout) in enumerate(itertools.pairwise(DECODER_WIDTHS), start=1):
            setattr(self, f"deconv{k}", nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1,
                                                          dilation=1, output_padding=1))
            setattr(self, f"bn{k}", nn.BatchNorm2d(cout))
        self.classifier = nn.Conv2d(DECODER_WIDTHS[-1], n_class, kernel_size=1)

    def _tail(self, score, first):
        """``score = bn_k(relu(deconv_k(score)))`` for k = first..5, the steps without skips."""
        for k in range(first, 6):
            score = getattr(self, f"bn{k}")(self.relu(getattr(self, f"deconv{k}")(score)))
        return score


class FCN32s(_FCNDecoder):
    def forward(self, x):
        return self.classifier(self._tail(self.pretrained_net(x)["x5"], 1))


class FCN16s(_FCNDecoder):
    def forward(self, x):
        out = self.pretrained_net(x)
        score = self.relu(self.deconv1(out["x5"]))
        score = self.bn1(score + out["x4"])
        return self.classifier(self._tail(score, 2))


class FCN8s(_FCNDecoder):
    def forward(self, x):
        out = self.pretrained_net(x)
        score = self.relu(self.deconv1(out["x5"]))
        score = self.bn1(score + out["x4"])
        score = self.relu(self.deconv2(score))
        score = self.bn2(score + out["x3"])
        return self.classifier(self._tail(score, 3))


class FCNs(_FCNDecoder):
    def forward(self, x):
        out = self.pretrained_net(x)
        score = self.bn1(self.relu(self.deconv1(out["x5"]))) + out["x4"]
        score = self.bn2(self.relu(self.deconv2(score))) + out["x3"]
        score = self.bn3(self.relu(self.deconv3(score))) + out["x2"]
        score = self.bn4(self.relu(self.deconv4(score))) + out["x1"]
        score = self.bn5(self.relu(self.deconv5(score)))
        return self.classifier(score)


TORCH_MODELS = {"fcn32s": FCN32s, "fcn16s": FCN16s, "fcn8s": FCN8s, "fcns": FCNs}


def build_torch_model(arch: str, num_classes: int, backbone: str = "vgg16", batch_norm: bool = False,
                      pretrained: bool = False) -> _FCNDecoder:
    """The reference FCN, e.g. ``build_torch_model("fcn8s", 21, "vgg16")``; NCHW in, NCHW logits out."""
    if arch not in TORCH_MODELS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(TORCH_MODELS)}")
    return TORCH_MODELS[arch](VGGNet(backbone, batch_norm=batch_norm, pretrained=pretrained), num_classes)


@torch.no_grad()
def randomize_batchnorm_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every BatchNorm's affine parameters and running statistics away from their defaults
    (and ``num_batches_tracked`` off zero), so fidelity checks exercise all of them."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return module
