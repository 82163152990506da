"""``fcn-jax <command>``: argument parsing only; the work is done by the library.

Errors that mean "your input is wrong" (:class:`fcn_jax.errors.FcnJaxError`) are printed as one line and
exit with status 2; anything else is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from fcn_jax import extras, registry
from fcn_jax.caches import use_compile_cache
from fcn_jax.choices import EXPORT_FORMATS, NORMALIZATIONS
from fcn_jax.data import DATASETS
from fcn_jax.errors import ConfigError, FcnJaxError
from fcn_jax.training.config import add_config_arguments, parse_size
from fcn_jax.xla_flags import use_fast_cpu_convolutions


def _cmd_convert(args) -> int:
    from fcn_jax.weights.convert import TOLERANCE, convert_checkpoint

    result = convert_checkpoint(output=args.output, input=args.input, torchvision=args.torchvision,
                                arch=args.arch, num_classes=args.num_classes, backbone=args.backbone,
                                batch_norm=args.batch_norm, seed=args.seed, verify=args.verify,
                                verify_size=args.verify_size)
    print(f"wrote {result.output}")
    for d in result.differences:
        print(f"verify {d.name:<7} max |jax - torch| = {d.max_abs:.3e}   max |torch| = {d.max_ref:.3e}   "
              f"relative = {d.relative:.2e}")
    if not result.verified_ok:
        print(f"fcn-jax: error: verification failed: relative difference above {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args) -> int:
    from fcn_jax.training.stopping import EXIT_STOPPED, StopRequests, TrainingStopped

    try:  # signals are caught from here on, before JAX loads (multi-host runs leave SIGTERM to JAX's service)
        with contextlib.nullcontext() if args.distributed else StopRequests(multi_process=False):
            return _run_training(args)
    except TrainingStopped as e:
        print(f"fcn-jax: {e}", file=sys.stderr)
        return EXIT_STOPPED


def _run_training(args) -> int:
    from fcn_jax.training.config import explicit_overrides, resolve_config
    from fcn_jax.training.run import initialize_distributed, resume, train

    overrides = explicit_overrides(args)
    if args.resume and args.preset:
        raise ConfigError("--resume continues the run with its saved settings; --preset cannot change them")
    config = None if args.resume else resolve_config(args.preset or "synthetic", **overrides)  # checked first
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.resume:
        resume(overrides.pop("run_dir", "runs/fcn"), overrides, progress=not args.no_progress)
    else:
        train(config, progress=not args.no_progress)
    return 0


def _cmd_evaluate(args) -> int:
    from fcn_jax.inference.evaluation import run_evaluate

    run_evaluate(args.weights, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                 batch_size=args.batch_size, normalization=args.normalization, output=args.output,
                 skip_bad=args.skip_bad_samples, workers=args.workers, resize_shorter=args.resize_shorter,
                 progress=not args.no_progress)
    return 0


def _cmd_predict(args) -> int:
    from fcn_jax.inference.prediction import run_predict

    run_predict(args.weights, args.inputs, args.output, overlay=args.overlay, index_png=args.index_png,
                save_logits=args.logits, normalization=args.normalization, batch_size=args.batch_size,
                max_side=args.max_side, skip_bad=args.skip_bad_samples, workers=args.workers,
                progress=not args.no_progress)
    return 0


def _cmd_heatmap(args) -> int:
    from fcn_jax.inference.heatmaps import run_heatmap

    for name, peak in run_heatmap(args.weights, args.image, args.output, top=args.top,
                                  normalization=args.normalization):
        print(f"{name:<30} peak probability {peak:.3f}")
    print(f"wrote {args.output}")
    return 0


def _cmd_export(args) -> int:
    from fcn_jax.deploy.exporting import export_file

    result = export_file(args.weights, format=args.format, output=args.output,
                         with_preprocessing=args.with_preprocessing, scores=args.scores,
                         normalization=args.normalization, size=args.size, check=not args.no_verify)
    if not result.ok:
        print("fcn-jax: error: the exported file differs from the JAX model by more than the tolerance (marked "
              "OVER TOLERANCE above); please report it with the command you ran", file=sys.stderr)
        return 1
    return 0


def _cmd_summary(args) -> int:
    from flax import nnx

    from fcn_jax.models import create_model
    from fcn_jax.models.summary import summary
    from fcn_jax.weights.native import load_model

    if args.weights:
        model = load_model(args.weights)
    else:  # shapes only: no weights are initialised
        options = {"aux_loss": True} if args.aux_loss else {}
        model = nnx.eval_shape(lambda: create_model(args.arch, num_classes=args.num_classes, backbone=args.backbone,
                                                    batch_norm=args.batch_norm, **options))
    print(summary(model))
    return 0


def _cmd_compare(args) -> int:
    compare = extras.pytorch("compare", "fcn-jax compare")
    result = compare.run_compare(arch=args.arch, backbone=args.backbone, batch_norm=args.batch_norm,
                                 num_classes=args.num_classes, batch_size=args.batch_size, size=args.size,
                                 weights=args.weights, float64=args.float64, seed=args.seed, lr=args.lr,
                                 repeats=args.repeats, warmup=args.warmup, fidelity=not args.no_fidelity,
                                 speed=not args.no_speed, torch_compile=args.torch_compile,
                                 progress=not args.no_progress, json_path=args.json)
    if not result.ok:
        print("fcn-jax: error: JAX and PyTorch differ by more than the tolerance (rows marked NO)", file=sys.stderr)
        return 1
    return 0


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    """The options evaluate and predict share."""
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default: one per device)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="leave out unreadable or invalid inputs and report how many")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that read the images (default: one per core but one, at most 16; 0: this one)")


def _add_architecture_options(p: argparse.ArgumentParser) -> None:
    """The architecture flags summary and compare share (a family's own default where not given)."""
    p.add_argument("--backbone", choices=registry.backbones(), help="default: vgg16 for the VGG families; the "
                                                                     "FCN-ResNets' is fixed by --arch")
    p.add_argument("--batch-norm", action="store_true", default=None, help="the _bn VGG backbone")
    p.add_argument("--aux-loss", action="store_true", help="the FCN-ResNets: with the aux head on layer3")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert PyTorch weights to fcn-jax .safetensors (or back to .pth)",
                       description="Convert a PyTorch FCN or torchvision VGG state_dict to an fcn-jax "
                                   ".safetensors file, or an fcn-jax file to a PyTorch .pth.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a .pth/.pt/.bin state_dict, a torch-layout .safetensors, or an fcn-jax "
                                     ".safetensors (with --output x.pth)")
    src.add_argument("--torchvision", metavar="NAME",
                     help="fetch torchvision's weights: vgg11..vgg19 (optionally _bn), resnet50, resnet101 "
                          "(ImageNet), fcn_resnet50, fcn_resnet101 (COCO with VOC's labels); needs internet or "
                          "torch hub's cache")
    p.add_argument("--output", required=True, help="the .safetensors (or .pth) file to write")
    p.add_argument("--arch", choices=registry.archs(), help="FCN variant; required for a whole FCN checkpoint, and "
                                                 "with a bare VGG builds an FCN around it")
    p.add_argument("--num-classes", type=int, help="default: read from the checkpoint's classifier")
    p.add_argument("--backbone", choices=registry.backbones(), help="default: read from the weights")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="default: read from the weights")
    p.add_argument("--seed", type=int, default=0, help="init seed of a new decoder and the verify batch")
    p.add_argument("--verify", action="store_true", help="run PyTorch and JAX on one random batch and print "
                                                         "the max difference (exit 1 above 1e-5 relative)")
    p.add_argument("--verify-size", type=parse_size, default=(224, 224), metavar="HxW")
    p.set_defaults(func=_cmd_convert)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an FCN (default: the built-in synthetic dataset, a few minutes on CPU)",
                       description="Train an FCN. With no arguments: FCNs-VGG11-BN on the built-in synthetic "
                                   "dataset. Every setting below overrides the --preset.")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (auto-detected on Cloud TPU, SLURM, "
                        "Kubernetes; elsewhere give --coordinator, --num-processes and --process-id)")
    p.add_argument("--coordinator", help="host:port of process 0, with --distributed")
    p.add_argument("--num-processes", type=int, help="with --distributed")
    p.add_argument("--process-id", type=int, help="with --distributed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="the FCN metrics of weights on a dataset split",
                       description="Pixel accuracy, mean accuracy, mean IoU, frequency-weighted IoU and per-class "
                                   "IoU over a whole split, whole images at their own sizes (or resized with "
                                   "--resize-shorter).")
    p.add_argument("weights", help="an fcn-jax .safetensors, or a training run directory (its best weights; "
                                   "dataset settings default to the run's)")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-dir")
    p.add_argument("--split", help="default: the run's validation split, else val")
    p.add_argument("--resize-shorter", type=int, metavar="N",
                   help="resize every image (bilinear, antialiased) and mask (nearest) so that its shorter side is N "
                        "pixels and score at that size: torchvision's evaluation of its segmentation weights uses "
                        "520 (default: the run's --val-resize-shorter, else the images' own sizes)")
    p.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="default: the run's or the weights file's, else imagenet")
    p.add_argument("--output", help="write OUTPUT.json (metrics, per-class IoU, confusion matrix) and "
                                    "OUTPUT_confusion.png; a folder (or a path ending in /) gets metrics.json and "
                                    "confusion.png inside")
    _add_batch_options(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images: colour masks, overlays, index PNGs, logits",
                       description="Segment images of any size with fcn-jax weights.")
    p.add_argument("weights", help="an fcn-jax .safetensors, or a training run directory (its best weights)")
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or glob patterns (quoted)")
    p.add_argument("--output", required=True, help="folder for NAME_mask.png (colour-coded) and the options below")
    p.add_argument("--overlay", action="store_true", help="also NAME_overlay.png: image | prediction, with a legend")
    p.add_argument("--index-png", action="store_true", help="also NAME_index.png: raw class indices")
    p.add_argument("--logits", action="store_true", help="also NAME_logits.npy: float32 (H, W, C)")
    p.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="as in training (default: the run's or the weights file's, else imagenet)")
    p.add_argument("--max-side", type=int, metavar="N",
                   help="predict images whose longer side exceeds N at that size and scale the results back "
                        "(bounds the memory a large photo needs; predict says when it is needed)")
    _add_batch_options(p)
    p.set_defaults(func=_cmd_predict)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="the same FCN in PyTorch and JAX: differences and speed",
                       description="Build the PyTorch reference and the JAX model with the same weights, feed "
                                   "both the same batch, and print the max abs/relative error of x1..x5, the "
                                   "logits (eval and train mode), the loss, gradients, BatchNorm statistics and "
                                   "parameters after one SGD step, then forward and training-step speed. Exits 1 "
                                   "when a difference is over its tolerance.")
    p.add_argument("--arch", choices=registry.archs(segmenters=True), default="fcn8s",
                   help="any segmentation net; the paper's are compared with dropout off in train mode (the "
                        "frameworks' random masks cannot agree)")
    _add_architecture_options(p)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--size", type=parse_size, default=(224, 224), metavar="HxW",
                   help="input size (default 224x224): multiples of 32 for the tutorial's FCNs, any for the paper's")
    p.add_argument("--weights", help="an fcn-jax .safetensors (its architecture wins) or a PyTorch reference FCN "
                                     ".pth; default: random weights with randomised BatchNorm statistics")
    p.add_argument("--float64", action="store_true", help="compare in float64 (tolerances 1e-8..1e-12)")
    p.add_argument("--seed", type=int, default=0, help="weights and batch")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the compared step")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each before timing")
    p.add_argument("--no-fidelity", action="store_true", help="speed only")
    p.add_argument("--no-speed", action="store_true", help="fidelity only")
    p.add_argument("--torch-compile", action="store_true",
                   help="also time torch.compile (needs a C++ compiler on CPU; compiling takes minutes)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)


def _add_heatmap(sub) -> None:
    p = sub.add_parser("heatmap", help="where the convolutionalized ImageNet classifier sees its top classes",
                       description="Score ImageNet's classes at every 32-pixel step of an image (at least 224x224) "
                                   "with the heatmap model and draw the top classes' probability maps over it.")
    p.add_argument("weights", help="an fcn-jax heatmap file (`fcn-jax convert --torchvision vgg16 --arch heatmap`)")
    p.add_argument("image")
    p.add_argument("--output", required=True, help="the picture (.png or .jpg)")
    p.add_argument("--top", type=int, default=3, help="classes to draw (default: 3)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="imagenet",
                   help="imagenet for torchvision's weights")
    p.set_defaults(func=_cmd_heatmap)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as ONNX or serialized StableHLO, checked in its runtime",
                       description="Export an fcn-jax weights file for deployment, then run the file in its own "
                                   "runtime (onnxruntime / deserialised JAX) on random batches at two sizes and "
                                   "compare it with the JAX model; exit 1 above 1e-5 relative. ONNX: NCHW float "
                                   "in, NCHW logits out, batch, height and width dynamic (needs the onnx extra). "
                                   "StableHLO: NHWC, symbolic batch, height and width multiples of 32 (or --size).")
    p.add_argument("weights", help="an fcn-jax .safetensors file (any segmentation net or the heatmap)")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    p.add_argument("--output", required=True, help="the file to write (e.g. fcn.onnx, fcn.jaxexport)")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="the graph takes uint8 RGB images (N, H, W, 3) and returns class ids (N, H, W)")
    p.add_argument("--scores", action="store_true", help="with --with-preprocessing: also return softmax scores")
    p.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="with --with-preprocessing: the input normalisation (default: the one stored in the weights "
                        "file by training, else imagenet)")
    p.add_argument("--size", type=parse_size, metavar="HxW", help="StableHLO: a fixed height and width")
    p.add_argument("--no-verify", action="store_true", help="write without running the file (not recommended)")
    p.set_defaults(func=_cmd_export)


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="print every parameter's name, shape and count",
                       description="Print the parameter table of a model (like the reference's show_params).")
    p.add_argument("--weights", help="an fcn-jax .safetensors file (overrides the architecture flags)")
    p.add_argument("--arch", choices=registry.archs(), default="fcn8s")
    _add_architecture_options(p)
    p.add_argument("--num-classes", type=int, default=21)
    p.set_defaults(func=_cmd_summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcn-jax", description="Fully Convolutional Networks in JAX/Flax NNX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_compare(sub)
    _add_heatmap(sub)
    _add_export(sub)
    _add_summary(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "float64", False):  # the flag slows float64 convolutions down: see fcn_jax/xla_flags.py
        use_fast_cpu_convolutions()  # before anything starts JAX's backend
    use_compile_cache()  # a second start loads its programs: see fcn_jax/caches.py
    try:
        return args.func(args)
    except FcnJaxError as e:
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
