"""fcn-jax models as ONNX graphs, written layer by layer from the model's own layer list.

The networks are a short list of ONNX's basic operators (Conv, ConvTranspose, BatchNormalization, Relu,
MaxPool, Add, Mul, Pad, Slice; Resize for the FCN-ResNets' bilinear upsampling, with the half-pixel convention
of PyTorch's ``align_corners=False``), so the graph is emitted directly with the ``onnx`` package rather than by
converting a traced JAX program: every layer keeps its name, the weights are stored once, in PyTorch's
layout, and the sizes that depend on the input (the padding to a multiple of 32, the crops) are computed
in the graph from the input's shape, so batch, height and width are all dynamic. Opset :data:`OPSET`.

Inputs and outputs (eval mode; dropout and BatchNorm statistics as in ``model.eval()``):

- plain: ``images`` float32 ``(N, 3, H, W)`` (NCHW, normalised as for training) -> ``logits`` float32
  ``(N, num_classes, H, W)`` (the heatmap: ``(N, 1000, H // 32 - 6, W // 32 - 6)``, ``H, W >= 224``);
- with preprocessing: ``images`` uint8 ``(N, H, W, 3)`` RGB, as decoded -> ``classes`` int64 ``(N, H, W)``
  (and ``scores``, float32 ``(N, H, W, num_classes)`` softmax probabilities, if asked: channels last like the
  input and the classes, and like the StableHLO export). The normalisation is
  the exact per-channel table training uses (:func:`fcn_jax.data.normalization.normalization_table`).
"""

from __future__ import annotations

import numpy as np

from fcn_jax.data.normalization import normalization_table
from fcn_jax.errors import ConfigError
from fcn_jax.models import FCN, Heatmap, PaperFCN, VGGBackbone
from fcn_jax.models.fcn import STRIDE
from fcn_jax.models.layers import BatchNorm2d, Conv2d, ConvTranspose2d

OPSET = 17  # onnxruntime 1.14+ and every current runtime run it


class _Graph:
    """Nodes and initialisers of one ONNX graph; each method returns the name of its output."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self._names = [], [], set()

    def _name(self, hint: str) -> str:
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def const(self, array, hint: str) -> str:
        name = self._name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attributes) -> str:
        out = self._name(hint)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attributes))
        return out

    # -- layers ---------------------------------------------------------------------------------------

    def _weights(self, layer: Conv2d | ConvTranspose2d, name: str) -> list[str]:
        """The kernel in PyTorch's layout (both layers' kernels: (kh, kw, a, b) -> (b, a, kh, kw)) and the bias."""
        weight = self.const(np.asarray(layer.kernel[...], np.float32).transpose(3, 2, 0, 1), f"{name}.weight")
        return [weight] + ([self.const(np.asarray(layer.bias[...], np.float32), f"{name}.bias")]
                           if layer.bias is not None else [])

    def conv(self, x: str, layer: Conv2d, name: str) -> str:
        (ph, pw), (kh, kw) = layer.padding, layer.kernel.shape[:2]
        return self.op("Conv", [x, *self._weights(layer, name)], name, kernel_shape=[kh, kw],
                       strides=list(layer.stride), dilations=list(layer.dilation), pads=[ph, pw, ph, pw])

    def conv_transpose(self, x: str, layer: ConvTranspose2d, name: str) -> str:
        kh, kw = layer.kernel.shape[:2]
        # the layer keeps the explicit padding (d(k-1) - p, d(k-1) - p + output_padding) of its convolution
        pads = [d * (k - 1) - lo for (lo, _), d, k in zip(layer.padding, layer.dilation, (kh, kw), strict=True)]
        output_padding = [hi - lo for lo, hi in layer.padding]
        return self.op("ConvTranspose", [x, *self._weights(layer, name)], name, kernel_shape=[kh, kw],
                       strides=list(layer.stride), dilations=list(layer.dilation), pads=[*pads, *pads],
                       output_padding=output_padding)

    def batch_norm(self, x: str, bn: BatchNorm2d, name: str) -> str:
        params = [self.const(np.asarray(v[...], np.float32), f"{name}.{key}")
                  for key, v in (("weight", bn.scale), ("bias", bn.bias), ("running_mean", bn.mean),
                                 ("running_var", bn.var))]
        return self.op("BatchNormalization", [x, *params], name, epsilon=float(bn.epsilon))

    def relu(self, x: str) -> str:
        return self.op("Relu", [x], f"{x}.relu")

    def height_width(self, x: str) -> str:
        """int64 ``[H, W]`` of an NCHW tensor."""
        shape = self.op("Shape", [x], f"{x}.shape")
        return self.op("Slice", [shape, self.const(np.array([2]), "two"), self.const(np.array([4]), "four")],
                       f"{x}.hw")

    def crop(self, x: str, offset: int, size: str, name: str) -> str:
        """``x[:, :, offset:offset + h, offset:offset + w]`` with ``[h, w]`` the int64 tensor ``size``."""
        start = self.const(np.array([offset, offset]), f"{name}.start")
        end = self.op("Add", [start, size], f"{name}.end") if offset else size
        return self.op("Slice", [x, start, end, self.const(np.array([2, 3]), "hw_axes")], name)

    # -- networks -------------------------------------------------------------------------------------

    def backbone(self, x: str, backbone: VGGBackbone) -> dict[str, str]:
        feats, j = {}, 0
        for v in backbone.cfg:
            if v == "M":
                x = self.op("MaxPool", [x], f"pool{len(feats) + 1}", kernel_shape=[2, 2], strides=[2, 2],
                            ceil_mode=int(backbone.ceil_mode))
                feats[f"x{len(feats) + 1}"] = x
            else:
                x = self.conv(x, backbone.convs[j], f"backbone.conv{j}")
                if backbone.batch_norm:
                    x = self.batch_norm(x, backbone.bns[j], f"backbone.bn{j}")
                x = self.relu(x)
                j += 1
        return feats

    def tutorial_fcn(self, images: str, model: FCN) -> str:
        hw = self.height_width(images)
        stride = self.const(np.array([STRIDE, STRIDE]), "stride")
        pad_hw = self.op("Mod", [self.op("Sub", [stride, self.op("Mod", [hw, stride], "rest")], "short"), stride],
                         "pad_hw")  # (-h) mod 32, from non-negative operands
        pads = self.op("Concat", [self.const(np.zeros(6, np.int64), "no_pads"), pad_hw], "pads", axis=0)
        feats = self.backbone(self.op("Pad", [images, pads], "padded"), model.backbone)
        score, before, after = feats["x5"], dict(model.skips_before_bn), dict(model.skips_after_bn)
        for k in range(1, 6):
            score = self.relu(self.conv_transpose(score, getattr(model, f"deconv{k}"), f"deconv{k}"))
            if k in before:
                score = self.op("Add", [score, feats[before[k]]], f"skip{k}")
            score = self.batch_norm(score, getattr(model, f"bn{k}"), f"bn{k}")
            if k in after:
                score = self.op("Add", [score, feats[after[k]]], f"skip{k}")
        return self.crop(self.conv(score, model.classifier, "classifier"), 0, hw, "cropped")

    def fully_convolutional(self, x5: str, model: PaperFCN | Heatmap) -> str:
        return self.relu(self.conv(self.relu(self.conv(x5, model.vgg.fc6, "fc6")), model.vgg.fc7, "fc7"))

    def paper_fcn(self, images: str, model: PaperFCN) -> str:
        feats = self.backbone(images, model.backbone)
        score = self.conv(self.fully_convolutional(feats["x5"], model), model.score_fr, "score_fr")
        for feature, score_layer, upsampling, offset, scale in model.skips:
            score = self.conv_transpose(score, getattr(model, upsampling), upsampling)
            skip = feats[feature]
            if scale != 1:
                scale = self.const(np.float32(scale), f"{score_layer}.scale")
                skip = self.op("Mul", [skip, scale], f"{feature}.scaled")
            skip = self.crop(self.conv(skip, getattr(model, score_layer), score_layer), offset,
                             self.height_width(score), f"{score_layer}.crop")
            score = self.op("Add", [score, skip], f"fuse_{score_layer}")
        name, _, offset = model.upsample
        return self.crop(self.conv_transpose(score, getattr(model, name), name), offset, self.height_width(images),
                         "cropped")

    def heatmap(self, images: str, model: Heatmap) -> str:
        return self.conv(self.fully_convolutional(self.backbone(images, model.backbone)["x5"], model), model.fc8,
                         "fc8")

    def bottleneck(self, x: str, block, name: str) -> str:
        y = self.relu(self.batch_norm(self.conv(x, block.conv1, f"{name}.conv1"), block.bn1, f"{name}.bn1"))
        y = self.relu(self.batch_norm(self.conv(y, block.conv2, f"{name}.conv2"), block.bn2, f"{name}.bn2"))
        y = self.batch_norm(self.conv(y, block.conv3, f"{name}.conv3"), block.bn3, f"{name}.bn3")
        if block.downsample is not None:
            x = self.batch_norm(self.conv(x, block.downsample.conv, f"{name}.downsample.0"), block.downsample.bn,
                                f"{name}.downsample.1")
        return self.relu(self.op("Add", [y, x], f"{name}.add"))

    def resnet_fcn(self, images: str, model) -> str:
        net = model.backbone
        x = self.relu(self.batch_norm(self.conv(images, net.conv1, "backbone.conv1"), net.bn1, "backbone.bn1"))
        x = self.op("MaxPool", [x], "backbone.maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        for i in range(1, 5):
            for b, block in enumerate(getattr(net, f"layer{i}")):
                x = self.bottleneck(x, block, f"backbone.layer{i}.{b}")
        head = model.classifier
        x = self.relu(self.batch_norm(self.conv(x, head.conv0, "classifier.0"), head.bn1, "classifier.1"))
        score = self.conv(x, head.conv4, "classifier.4")
        batch_channels = self.op("Slice", [self.op("Shape", [score], "score.shape"), self.const(np.array([0]), "zero"),
                                           self.const(np.array([2]), "two")], "score.nc")
        sizes = self.op("Concat", [batch_channels, self.height_width(images)], "resize.sizes", axis=0)
        return self.op("Resize", [score, "", "", sizes], "upsampled", mode="linear",
                       coordinate_transformation_mode="half_pixel")

    def preprocess(self, pixels: str, normalization: str) -> str:
        """uint8 NHWC RGB -> float32 NCHW network input, through the training pipeline's exact table."""
        from fcn_jax.data.normalization import BGR_MODES

        index = self.op("Cast", [pixels], "pixels.int64", to=self.helper.np_dtype_to_tensor_dtype(np.dtype("int64")))
        if normalization in BGR_MODES:
            index = self.op("Gather", [index, self.const(np.array([2, 1, 0]), "bgr")], "pixels.bgr", axis=3)
        index = self.op("Add", [index, self.const(np.array([0, 256, 512]), "channel_offsets")], "table_index")
        table = self.const(normalization_table(normalization).T.reshape(-1).astype(np.float32), "normalization")
        return self.op("Transpose", [self.op("Gather", [table, index], "normalised")], "images_nchw",
                       perm=[0, 3, 1, 2])


def onnx_model(model, *, with_preprocessing: bool = False, normalization: str = "imagenet", scores: bool = False):
    """The ``onnx.ModelProto`` of ``model`` (see the module doc for its inputs and outputs)."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    if with_preprocessing:
        inputs = [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", "height", "width", 3])]
        network_input = g.preprocess("images", normalization)
    else:
        inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])]
        network_input = "images"
    writers = {"tutorial": g.tutorial_fcn, "paper": g.paper_fcn, "heatmap": g.heatmap,  # by registry family
               "resnet": g.resnet_fcn}
    if model.family not in writers:
        raise ConfigError(f"ONNX export covers the {', '.join(writers)} families, not {model.family} "
                          f"({model.arch}): export it with --format stablehlo")
    logits = writers[model.family](network_input, model)
    classes = model.num_classes
    if with_preprocessing:
        outputs = [helper.make_tensor_value_info(g.op("ArgMax", [logits], "classes", axis=1, keepdims=0),
                                                 TensorProto.INT64, ["batch", "height", "width"])]
        if scores:
            probabilities = g.op("Softmax", [logits], "probabilities", axis=1)
            outputs.append(helper.make_tensor_value_info(g.op("Transpose", [probabilities], "scores",
                                                              perm=[0, 2, 3, 1]),
                                                         TensorProto.FLOAT, ["batch", "height", "width", classes]))
    else:
        out_hw = ["out_height", "out_width"] if isinstance(model, Heatmap) else ["height", "width"]
        outputs = [helper.make_tensor_value_info(g.op("Identity", [logits], "logits"), TensorProto.FLOAT,
                                                 ["batch", classes, *out_hw])]
    graph = helper.make_graph(g.nodes, f"fcn_jax_{model.arch}", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fcn-jax")
    onnx.checker.check_model(proto, full_check=True)
    return proto
