"""A parameter table like the reference's ``show_params``: names, shapes and counts per part."""

from __future__ import annotations

import re

from flax import nnx


def _part(name: str) -> str:
    """backbone (``backbone.*``, or everything of a bare VGGBackbone), decoder or classifier; for the paper's
    networks fc6-fc8 ("fully connected, as convolutions") and the score and upsampling layers ("head")."""
    head = name.removeprefix("vgg.").split(".", 1)[0]
    if re.fullmatch(r"(deconv|bn)\d", head):
        return "decoder"
    if re.fullmatch(r"fc\d", head):
        return "fc6-fc8"
    if head.startswith(("score", "upscore")):
        return "head"
    if head == "aux_classifier":
        return "aux classifier"
    return "classifier" if head == "classifier" else "backbone"


def summary(model) -> str:
    """The table of every parameter of ``model`` (an FCN or a VGGBackbone) with per-part totals
    (backbone, decoder, classifier) and the number of BatchNorm statistics, which are not trained."""
    params = [(".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    stats = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    width = max(len(n) for n, _ in params) + 2
    lines = [model.describe(), f"{'parameter':<{width}}{'shape':<22}{'count':>12}"]
    parts: dict[str, int] = {}
    for name, var in params:
        lines.append(f"{name:<{width}}{tuple(var.shape)!s:<22}{var.size:>12,}")
        parts[_part(name)] = parts.get(_part(name), 0) + var.size
    total = sum(parts.values())
    nbytes = sum(v.size * v.dtype.itemsize for _, v in params)
    lines.append("")
    lines += [f"{part:<{width}}{'':<22}{count:>12,}" for part, count in parts.items()]
    lines.append(f"{'total':<{width}}{'':<22}{total:>12,}")
    lines.append(f"{total:,} trainable parameters ({nbytes / 2**20:.1f} MiB); "
                 f"{sum(v.size for _, v in stats):,} BatchNorm statistics (not trained)")
    return "\n".join(lines)
