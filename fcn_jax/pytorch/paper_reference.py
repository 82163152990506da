"""The paper's segmentation networks in PyTorch, written from their published description, in the state_dict
layout of the PyTorch port of the Caffe weights (``conv1_1`` .. ``conv5_3``, ``fc6``, ``fc7``, ``score_fr``,
``score_pool4``, ``score_pool3``, ``upscore*``), for any VGG depth by the same rule (``convB_L``: block B, layer
L). NCHW in, NCHW logits of the input's size out. fcn-jax's :mod:`fcn_jax.models.paper` is tested against these."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import VGG, make_layers

from fcn_jax.errors import ConfigError
from fcn_jax.models.paper import bilinear_kernel
from fcn_jax.models.vgg import check_backbone_name, conv_names

SKIPS = {  # arch -> ((pool, score layer, upsampling, crop, scale), ...), (last upsampling, stride, crop)
    "fcn32s_paper": ((), ("upscore", 32, 19)),
    "fcn16s_paper": ((("pool4", "score_pool4", "upscore2", 5, 1.0),), ("upscore16", 16, 27)),
    "fcn8s_paper": ((("pool4", "score_pool4", "upscore2", 5, 1.0), ("pool3", "score_pool3", "upscore_pool4", 9, 1.0)),
                    ("upscore8", 8, 31)),
    "fcn8s_atonce_paper": ((("pool4", "score_pool4", "upscore2", 5, 0.01),
                            ("pool3", "score_pool3", "upscore_pool4", 9, 0.0001)), ("upscore8", 8, 31)),
}


class _Trunk(nn.Module):
    """VGG's convolutions (``first_padding`` on conv1_1) with ceil- or floor-mode pools, then fc6 and fc7 as
    convolutions, with ReLU and Dropout2d; the layers are attributes of the model itself, so that its state_dict
    has the published names."""

    def _build_trunk(self, backbone: str, first_padding: int, ceil_mode: bool, fc_width: int) -> None:
        self.cfg, self.ceil_mode, self.names = check_backbone_name(backbone), ceil_mode, conv_names(backbone)
        cin = 3
        for j, (name, v) in enumerate(zip(self.names, (w for w in self.cfg if w != "M"), strict=True)):
            self.add_module(name, nn.Conv2d(cin, v, 3, padding=first_padding if j == 0 else 1))
            cin = v
        self.fc6, self.fc7 = nn.Conv2d(512, fc_width, 7), nn.Conv2d(fc_width, fc_width, 1)
        self.drop6, self.drop7 = nn.Dropout2d(), nn.Dropout2d()

    def _trunk(self, x):
        """``({"pool1": .., "pool5": ..}, fc7's output)``."""
        pools, names = {}, iter(self.names)
        for v in self.cfg:
            if v == "M":
                x = nn.functional.max_pool2d(x, 2, 2, ceil_mode=self.ceil_mode)
                pools[f"pool{len(pools) + 1}"] = x
            else:
                x = torch.relu(getattr(self, next(names))(x))
        x = self.drop6(torch.relu(self.fc6(x)))
        return pools, self.drop7(torch.relu(self.fc7(x)))


class PaperFCN(_Trunk):
    def __init__(self, arch: str, n_class: int = 21, backbone: str = "vgg16", fc_width: int = 4096):
        super().__init__()
        self._build_trunk(backbone, 100, ceil_mode=True, fc_width=fc_width)
        self.skips, self.last = SKIPS[arch]
        self.score_fr = nn.Conv2d(fc_width, n_class, 1)
        widths = {"pool4": 512, "pool3": 256}
        for pool, score, upsampling, _, _ in self.skips:
            self.add_module(score, nn.Conv2d(widths[pool], n_class, 1))
            self.add_module(upsampling, _upsampling(n_class, 4, 2))
        name, stride, _ = self.last
        self.add_module(name, _upsampling(n_class, 2 * stride, stride))
        for layer in (self.score_fr, *(getattr(self, s) for _, s, _, _, _ in self.skips)):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.features_and_logits(x)[1]

    def features_and_logits(self, x):
        """``({"x1": pool1, .., "x5": pool5}, logits)``, the features named as fcn-jax names them."""
        h, w = x.shape[2:]
        pools, fc7 = self._trunk(x)
        score = self.score_fr(fc7)
        for pool, score_layer, upsampling, offset, scale in self.skips:
            score = getattr(self, upsampling)(score)
            skip = getattr(self, score_layer)(pools[pool] * scale)
            score = score + skip[:, :, offset:offset + score.shape[2], offset:offset + score.shape[3]]
        name, _, offset = self.last
        features = {f"x{k[4:]}": v for k, v in pools.items()}
        return features, getattr(self, name)(score)[:, :, offset:offset + h, offset:offset + w]


class Heatmap(VGG):
    """torchvision's VGG (same modules, same state_dict) whose classifier runs as convolutions: ``forward``
    gives the ``(N, num_classes, H // 32 - 6, W // 32 - 6)`` score map of an image of at least 224x224 (1x1 at
    224x224: the classifier's logits)."""

    def __init__(self, n_class: int = 1000, backbone: str = "vgg16"):
        super().__init__(make_layers(list(check_backbone_name(backbone))), num_classes=n_class)

    def forward(self, x):
        x = self.features(x)
        fc6, fc7, fc8 = self.classifier[0], self.classifier[3], self.classifier[6]
        for layer, shape in ((fc6, (4096, 512, 7, 7)), (fc7, (4096, 4096, 1, 1))):
            x = nn.functional.dropout2d(torch.relu(nn.functional.conv2d(x, layer.weight.view(shape), layer.bias)),
                                        training=self.training)
        return nn.functional.conv2d(x, fc8.weight.view(*fc8.weight.shape, 1, 1), fc8.bias)


def _upsampling(channels: int, size: int, stride: int) -> nn.ConvTranspose2d:
    layer = nn.ConvTranspose2d(channels, channels, size, stride=stride, bias=False)
    with torch.no_grad():  # (kh, kw, out, in) -> torch's (in, out, kh, kw)
        layer.weight.copy_(torch.from_numpy(bilinear_kernel(size, channels).transpose(3, 2, 0, 1)))
    return layer


def build_paper_model(arch: str, num_classes: int, backbone: str = "vgg16", seed: int = 0,
                      fc_width: int = 4096) -> nn.Module:
    """A paper model (or ``heatmap``, torchvision's VGG: ``fc_width`` 4096 only) with random weights everywhere
    (the score layers too, so that tests see every layer; the upsampling stays bilinear, as in training)."""
    torch.manual_seed(seed)
    if arch == "heatmap":
        if fc_width != 4096:
            raise ConfigError("the heatmap reference is torchvision's VGG: its classifier is 4096 wide")
        model = Heatmap(num_classes, backbone)
    else:
        model = PaperFCN(arch, num_classes, backbone, fc_width)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("upscore"):
                p.normal_(0, (2.0 / max(1, p[0].numel())) ** 0.5 if p.ndim > 1 else 0.1)
    return model
