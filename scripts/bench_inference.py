"""Benchmark: SSD300-VGG16 inference images/s on CPU, full path (network + post-processing).

Ours (``SSD300VGG16`` + ``PostProcessor``) against torchvision's ``ssd300_vgg16`` (eval mode,
its own transform and ``postprocess_detections``) with the SAME random weights (copied with
``copy_from_torchvision_ssd300``), the same default boxes (COCO size table, Caffe steps), and
the same thresholds (score 0.01, NMS 0.45, 400 candidates per class, 200 detections). Also our
network exported to ONNX and run in onnxruntime, with our post-processing in torch.

"ours" runs the network in channels-last memory format, as ``SSDModule.detect`` does with
``channels_last`` (the ``ssd-predict`` default): oneDNN's convolutions are faster in it on CPU.
The same layout applied to torchvision's model ("torchvision NHWC") and our network in the default
layout ("ours NCHW") are timed too, so the share of the layout and of the post-processing in the
ratio is visible.

Inputs are pre-resized 300x300 RGB in [0, 1]: torchvision resizes 300 -> 300 and normalises
them itself; ours gets the same normalisation (mean 0.482/0.459/0.408, std 1/255) in the timed
path. A randomly initialised network scores all 90 classes near 1/91 > 0.01, which would flood
NMS, so the background logit bias is raised until about ``--candidates`` (anchor, class) pairs
per image pass 0.01, and the box regression is scaled to unit-std offsets, as for a trained
model. Both models get these weights (changed before the copy).

    python scripts/bench_inference.py [--threads 2] [--repeats 3] [--iters 1] [--batch-sizes 1 8]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_iou

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.models import SSD300VGG16, copy_from_torchvision_ssd300
from ssd_lightning.postprocess import PostProcessor

NUM_CLASSES = 91  # torchvision's COCO model
COCO_SIZES = [21, 45, 99, 153, 207, 261, 315]  # torchvision scales 0.07..1.05 x 300
CAFFE_STEPS = [8, 16, 32, 64, 100, 300]
Detections = list[dict[str, Tensor]]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_torchvision_model(candidates: int, calibration: Tensor) -> nn.Module:
    """torchvision's SSD300 with random weights and a realistic post-processing workload."""
    torch.manual_seed(0)
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        x = tv.transform(list(calibration))[0].tensors
        out = tv.head(list(tv.backbone(x).values()))
        loc_std = float(out["bbox_regression"].std())
        for conv in tv.head.regression_head.module_list:  # unit-std offsets
            conv.weight /= loc_std
            conv.bias /= loc_std
        bias = background_bias(out["cls_logits"], candidates)
        for conv in tv.head.classification_head.module_list:
            conv.bias.view(-1, NUM_CLASSES)[:, 0] += bias  # channel = box * C + class
    return tv


def background_bias(logits: Tensor, candidates: float) -> float:
    """Background logit offset giving about ``candidates`` pairs above 0.01 per image."""
    low, high = -10.0, 40.0
    for _ in range(40):  # bisection: more bias -> fewer pairs
        mid = (low + high) / 2
        shifted = logits.clone()
        shifted[..., 0] += mid
        above = (shifted.softmax(-1)[..., 1:] > 0.01).sum() / logits.shape[0]
        low, high = (mid, high) if above > candidates else (low, mid)
    return (low + high) / 2


def ours_pipeline(
    tv: nn.Module, channels_last: bool
) -> tuple[Callable[[Tensor], Detections], nn.Module, SSDBoxCoder]:
    net = SSD300VGG16(NUM_CLASSES).eval()
    copy_from_torchvision_ssd300(net, tv.state_dict())
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=layout)
    default_boxes = DefaultBoxes(300, net.feature_map_sizes(300), sizes=COCO_SIZES,
                                 steps=CAFFE_STEPS, clip=True)  # fmt: skip
    coder = SSDBoxCoder(default_boxes.cxcywh)
    post = PostProcessor(coder, score_threshold=0.01, nms_threshold=0.45,
                         candidates_per_class=400, max_detections=200)  # fmt: skip
    mean = torch.tensor(tv.transform.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(tv.transform.image_std).view(1, 3, 1, 1)

    @torch.no_grad()
    def run(images: Tensor) -> Detections:
        loc, logits = net(((images - mean) / std).contiguous(memory_format=layout))
        sizes = torch.tensor([images.shape[-2:]] * len(images))
        return post(loc, logits, sizes)

    run.normalise = lambda images: (images - mean) / std  # type: ignore[attr-defined]
    run.post = post  # type: ignore[attr-defined]
    return run, net, coder


def check_default_boxes(tv: nn.Module, coder: SSDBoxCoder, images: Tensor) -> float:
    """Max difference (pixels) between our default boxes and torchvision's anchors."""
    with torch.no_grad():
        image_list, _ = tv.transform(list(images[:1]))
        features = list(tv.backbone(image_list.tensors).values())
        anchors = tv.anchor_generator(image_list, features)[0]  # (A, 4) xyxy pixels
    ours = coder.default_xyxy * 300
    return float((anchors - ours).abs().max())


def canonical(det: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detections by decreasing score, equal scores by label then box (ties order freely)."""
    order = torch.arange(len(det["scores"]))
    keys = [
        *det["boxes"].double().unbind(-1)[::-1],
        det["labels"].double(),
        -det["scores"].double(),
    ]
    for key in keys:  # least significant first, stable sorts
        order = order[torch.sort(key[order], stable=True).indices]
    return {k: v[order] for k, v in det.items()}


def compare(ours: Detections, theirs: Detections) -> dict[str, float]:
    """Same detections? Position-wise max differences and an order-free match rate."""
    box_diff = score_diff = 0.0
    same_count = same_labels = True
    matched = total = 0
    for a, b in zip(map(canonical, ours), map(canonical, theirs), strict=True):
        same_count &= len(a["boxes"]) == len(b["boxes"])
        n = min(len(a["boxes"]), len(b["boxes"]))
        if n:
            box_diff = max(box_diff, float((a["boxes"][:n] - b["boxes"][:n]).abs().max()))
            score_diff = max(score_diff, float((a["scores"][:n] - b["scores"][:n]).abs().max()))
            same_labels &= bool(torch.equal(a["labels"][:n], b["labels"][:n]))
        # Order-free: a torchvision detection is matched by one of ours of the same label at
        # IoU > 0.99 with a score within 1e-4.
        if len(b["boxes"]) and len(a["boxes"]):
            iou = box_iou(b["boxes"], a["boxes"].to(b["boxes"].dtype))
            same = (b["labels"][:, None] == a["labels"][None]) & (
                (b["scores"][:, None] - a["scores"][None]).abs() < 1e-4
            )
            matched += int(((iou > 0.99) & same).any(dim=1).sum())
        total += len(b["boxes"])
    return {
        "same_count": same_count,
        "same_labels": same_labels,
        "max_box_diff": box_diff,
        "max_score_diff": score_diff,
        "match_rate": matched / total if total else 1.0,
        "detections_per_image": total / len(theirs),
    }


def onnx_pipeline(net: nn.Module, post: PostProcessor, normalise, threads: int, tmp: Path):
    """(network-only fn, full-path fn) in onnxruntime, or a reason string when unavailable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        import onnxscript  # noqa: F401
    except ImportError as e:
        return f"skipped: {e.name} is not installed (pip install -e '.[export]')"
    path = tmp / "ssd300.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(net, (torch.randn(2, 3, 300, 300),), str(path), input_names=["images"],
                      output_names=["loc", "cls_logits"], dynamic_shapes=({0: batch},),
                      dynamo=True, verbose=False)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def network(images: Tensor) -> tuple[Tensor, Tensor]:
        loc, logits = session.run(None, {"images": normalise(images).numpy()})
        return torch.from_numpy(loc), torch.from_numpy(logits)

    def full(images: Tensor) -> Detections:
        loc, logits = network(images)
        return post(loc, logits, torch.tensor([images.shape[-2:]] * len(images)))

    return network, full


def postprocess_pair(tv: nn.Module, post: PostProcessor, normalise, net: nn.Module, batch: Tensor):
    """Post-processing alone on one batch's raw outputs: (ours fn, torchvision fn)."""
    with torch.no_grad():
        image_list, _ = tv.transform(list(batch))
        features = list(tv.backbone(image_list.tensors).values())
        head = tv.head(features)
        anchors = tv.anchor_generator(image_list, features)
        loc, logits = net(normalise(batch))
    sizes = torch.tensor([batch.shape[-2:]] * len(batch))
    original = [tuple(batch.shape[-2:])] * len(batch)

    def ours() -> Detections:
        return post(loc, logits, sizes)

    def theirs() -> Detections:
        with torch.no_grad():
            det = tv.postprocess_detections(head, anchors, image_list.image_sizes)
            return tv.transform.postprocess(det, image_list.image_sizes, original)

    return ours, theirs


def timed(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call over ``iters`` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench_batch(pipelines, onnx_full, batch: Tensor, post_pair, args) -> None:
    """Check detections, then time the full paths and post-processing alone.

    ONNX + post-processing is not timed separately: its post-processing is ours on the same
    outputs, so its rate is derived from the ONNX network time plus our post-processing time.
    """
    results = {name: fn(batch) for name, fn in pipelines.items()}  # warm-up
    if onnx_full is not None:
        results["onnx + post"] = onnx_full(batch)
    for name in ("ours", "ours NCHW", "onnx + post"):
        if name in results:
            check = compare(results[name], results["torchvision"])
            print(f"  {name} vs torchvision detections: {format_check(check)}")
    runs: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for name, fn in pipelines.items():
            runs[name].append(timed(lambda f=fn: f(batch), args.iters))
    post_runs: dict[str, list[float]] = {"ours": [], "torchvision": []}
    for _ in range(args.repeats):
        for name, fn in zip(post_runs, post_pair, strict=True):
            post_runs[name].append(timed(fn, 3 * args.iters))
    post = {name: statistics.median(v) for name, v in post_runs.items()}
    seconds = {name: statistics.median(v) for name, v in runs.items()}
    if "onnx network" in seconds:
        seconds["onnx + post"] = seconds["onnx network"] + post["ours"]
    for name, value in seconds.items():
        spread = "network + our post-processing"
        if name in runs:
            spread = f"runs {len(batch) / max(runs[name]):.2f}-{len(batch) / min(runs[name]):.2f}"
        print(f"  {name:<16} {len(batch) / value:7.2f} images/s  ({spread})  "
              f"x{seconds['torchvision'] / value:.2f} vs torchvision")  # fmt: skip
    ours, theirs = 1000 * post["ours"], 1000 * post["torchvision"]
    print(f"  post-processing only: ours {ours:.1f} ms/batch, torchvision {theirs:.1f} ms/batch "
          f"(torchvision / ours = {theirs / ours:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is kept")
    parser.add_argument("--iters", type=int, default=1, help="batches per timed run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--candidates", type=int, default=2000,
                        help="(anchor, class) pairs above 0.01 per image")  # fmt: skip
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"settings: torch {torch.__version__}, {torch.get_num_threads()} threads, batch sizes "
        f"{args.batch_sizes}, median of {args.repeats} runs x {args.iters} batches after 1 "
        f"warm-up batch; SSD300-VGG16, {NUM_CLASSES} classes, 300x300 input; score 0.01, NMS "
        f"0.45, 400 candidates/class, 200 detections; ~{args.candidates} pairs > 0.01 per image"
    )
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.rand(b, 3, 300, 300, generator=gen) for b in args.batch_sizes}
    tv = make_torchvision_model(args.candidates, torch.rand(4, 3, 300, 300, generator=gen))
    ours, _, coder = ours_pipeline(tv, channels_last=True)
    ours_nchw, net, _ = ours_pipeline(tv, channels_last=False)
    tv_nhwc = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    diff = check_default_boxes(tv, coder, images[args.batch_sizes[0]])
    print(f"default boxes vs torchvision anchors: max diff {diff:.2e} px")
    print(f"peak RSS after building both models: {peak_rss_mib():.0f} MiB")

    def theirs(batch: Tensor) -> Detections:
        with torch.no_grad():
            return tv(list(batch))

    def theirs_nhwc(batch: Tensor) -> Detections:
        with torch.no_grad():
            return tv_nhwc(list(batch))

    pipelines: dict[str, Callable[[Tensor], object]] = {
        "ours": ours,
        "torchvision": theirs,
        "ours NCHW": ours_nchw,
        "torchvision NHWC": theirs_nhwc,
    }
    onnx_full = None
    with tempfile.TemporaryDirectory() as tmp:
        onnx = "skipped (--no-onnx)"
        if not args.no_onnx:
            onnx = onnx_pipeline(net, ours.post, ours.normalise, args.threads, Path(tmp))
        if isinstance(onnx, str):
            print(f"onnx: {onnx}")
        else:
            pipelines["onnx network"], onnx_full = onnx
            print(f"peak RSS after ONNX export and session: {peak_rss_mib():.0f} MiB")
        for b, batch in images.items():
            print(f"\nbatch {b}:")
            post_pair = postprocess_pair(tv, ours.post, ours.normalise, net, batch)
            bench_batch(pipelines, onnx_full, batch, post_pair, args)
    print(f"\npeak RSS: {peak_rss_mib():.0f} MiB")


def format_check(check: dict[str, float]) -> str:
    return (
        f"match rate {100 * check['match_rate']:.2f}%, max box diff {check['max_box_diff']:.2e} "
        f"px, max score diff {check['max_score_diff']:.2e}, same count {check['same_count']}, "
        f"same labels {check['same_labels']}, {check['detections_per_image']:.0f} det/image"
    )


if __name__ == "__main__":
    main()
