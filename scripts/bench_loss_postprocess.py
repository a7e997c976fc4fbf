"""Benchmark: MultiBox loss and post-processing vs torchvision's SSD, on the same inputs.

(a) loss forward + backward: ``MultiBoxLoss`` vs ``SSD.compute_loss`` (target ratio <= 0.5),
    SSD300 shapes (8732 default boxes), ``--classes`` classes, batch ``--batch``;
(b) post-processing: ``PostProcessor`` vs ``SSD.postprocess_detections`` at every
    ``--post-batches`` size (target: >= 3x faster at batch > 1, not slower at batch 1), on two
    kinds of workloads:
    - random (``--random``, one per class count; 21 and 91 by default): N(0, 1) logits (~86%
      of the (box, class) scores pass 0.01 with 21 classes, ~35% with 91, as for an untrained
      model) and N(0, 0.5) offsets;
    - trained-like (``--realistic``, one per CLASSES:PAIRS): objects whose matched default
      boxes regress to them with little spread (clusters) and score their class high, the
      other boxes near themselves, logit noise with a per-image class preference, and the
      background logit raised until PAIRS (anchor, class) pairs per image pass 0.01 (a
      fraction of all pairs when < 1). Defaults: 91 classes with ~2,000 pairs (a COCO SSD300)
      and 21 classes with 13%.
Timings are medians of interleaved runs (ours, torchvision, ours, ...) after warm-up, so load
on a shared machine hits both sides alike; batch-1 rows run 5x the repeats. Each
post-processing row notes the pools ``PostProcessor`` searched (pairs per image x images).

    python scripts/bench_loss_postprocess.py [--device cuda] [--threads 1] [--repeats 9]
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD

from bench_inference import background_bias  # sibling script (scripts/ is on sys.path)
from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.postprocess import PostProcessor

# torchvision's ssd300_vgg16 default boxes: COCO size table and Caffe steps.
FEATURE_MAPS = [38, 19, 10, 5, 3, 1]
SIZES = [21, 45, 99, 153, 207, 261, 315]
STEPS = [8, 16, 32, 64, 100, 300]
TV_CODER = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))  # = 1 / variances (0.1, 0.2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=21, help="including background")
    parser.add_argument("--objects", type=int, default=13, help="GT boxes per image")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--post-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--random", type=int, nargs="*", default=[21, 91], help="random workloads: classes"
    )
    parser.add_argument(
        "--realistic",
        nargs="*",
        default=["91:2000", "21:0.13"],
        metavar="CLASSES:PAIRS",
        help="trained-like workloads: classes and pairs > 0.01 per image (< 1: a fraction)",
    )
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median wall time (ms) of each function, runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call adds: CUDA allocator peak, or on CPU the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs; NaN where Linux does not allow it)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
    except OSError:
        return float("nan")
    base = proc_status_kib("VmRSS")
    fn()
    return (proc_status_kib("VmHWM") - base) / 1024


def release_free_heap() -> None:
    """Make glibc hand freed memory back and mmap large blocks, so RSS follows live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also stops its dynamic growth)
    libc.malloc_trim(0)


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def random_ground_truth(b, g, classes, device, gen):
    """Padded normalised GT boxes (B, G, 4), labels (B, G) and validity (B, G)."""
    centre = torch.rand(b, g, 2, generator=gen) * 0.8 + 0.1
    half = (torch.rand(b, g, 2, generator=gen) * 0.3 + 0.05) / 2
    boxes = torch.cat([centre - half, centre + half], dim=-1).clamp(0, 1)
    labels = torch.randint(1, classes, (b, g), generator=gen)
    valid = torch.ones(b, g, dtype=torch.bool)
    return boxes.to(device), labels.to(device), valid.to(device)


def bench_loss(args, device, gen, anchors, coder):
    gt, gt_labels, valid = random_ground_truth(args.batch, args.objects, args.classes, device, gen)
    loc_targets, labels = coder.encode_batch(gt, gt_labels, valid)
    matched = coder.match(gt, valid)  # the same matches for torchvision
    shape = (args.batch, len(anchors))
    loc = torch.randn(*shape, 4, generator=gen).to(device).requires_grad_()
    logits = torch.randn(*shape, args.classes, generator=gen).to(device).requires_grad_()

    ours_fn = MultiBoxLoss(neg_pos_ratio=3.0)
    size = 300.0
    targets = [{"boxes": gt[i] * size, "labels": gt_labels[i]} for i in range(args.batch)]
    tv_anchors = [anchors.xyxy.to(device) * size] * args.batch
    fake_ssd = SimpleNamespace(box_coder=TV_CODER, neg_to_pos_ratio=3)

    def ours():
        out = ours_fn(loc, logits, loc_targets, labels)
        out["loss"].backward()
        return out

    def theirs():
        head = {"bbox_regression": loc, "cls_logits": logits}
        out = SSD.compute_loss(fake_ssd, targets, head, tv_anchors, list(matched))
        sum(out.values()).backward()
        return out

    a, b = ours(), theirs()
    pairs = [(a["loss_box"], b["bbox_regression"]), (a["loss_cls"], b["classification"])]
    rel = max(abs(x.item() - y.item()) / abs(y.item()) for x, y in pairs)
    positives = (labels > 0).sum(1).float()
    note = (
        f"positives/image mean {positives.mean():.1f} (min {positives.min():.0f}, "
        f"max {positives.max():.0f}); torchvision also encodes its regression targets inside "
        f"compute_loss (ours get them from the data pipeline); loss ours "
        f"{a['loss'].item():.5f} vs torchvision "
        f"{(b['bbox_regression'] + b['classification']).item():.5f}, max rel diff {rel:.1e}"
    )
    return {"ours": ours, "torchvision": theirs}, rel < 1e-4, note


def random_outputs(batch, classes, gen, anchors):
    """Untrained-like outputs: N(0, 0.5) offsets, N(0, 1) logits."""
    loc = torch.randn(batch, len(anchors), 4, generator=gen) * 0.5
    return loc, torch.randn(batch, len(anchors), classes, generator=gen)


def trained_like_outputs(batch, classes, pairs, gen, coder, objects, near=0.25):
    """Outputs shaped like a trained SSD's: background dominant, boxes clustered.

    Every image holds ``objects`` objects. The default boxes near one (SSD matching at IoU
    ``near``) regress to it with a small spread (offsets N(0, 0.3): a few % of the box) and
    score its class 5 logits higher; every other default box regresses near itself (N(0, 1)).
    Logits are N(0, 1) noise plus a per-image N(0, 1.5) class preference (an image has a few
    likely classes, which is what makes a model's passing pairs cluster in ~20 of 90 classes),
    and the background logit is raised until ``pairs`` (anchor, class) pairs per image score
    above 0.01 (``pairs`` < 1: that fraction of all pairs).
    """
    gt, gt_labels, valid = random_ground_truth(batch, objects, classes, "cpu", gen)
    matcher = SSDBoxCoder(coder.default_boxes.cpu(), iou_threshold=near)
    loc, labels = matcher.encode_batch(gt, gt_labels, valid)
    positive = labels > 0
    spread = torch.where(positive, 0.3, 1.0)[..., None]
    loc = loc + torch.randn(loc.shape, generator=gen) * spread
    logits = torch.randn(*labels.shape, classes, generator=gen)
    logits += torch.randn(batch, 1, classes, generator=gen) * 1.5
    logits.scatter_add_(-1, labels[..., None], positive[..., None] * 5.0)
    target = pairs * len(coder) * (classes - 1) if pairs < 1 else pairs
    logits[..., 0] += background_bias(logits, target)
    return loc, logits


def bench_postprocess(loc, logits, device, gen, anchors, coder):
    """Post-processing of one batch of outputs, ours vs torchvision's, both on ``device``."""
    batch = len(loc)
    loc, logits = loc.to(device), logits.to(device)
    sizes = torch.stack([torch.randint(240, 640, (batch,), generator=gen) for _ in range(2)], 1)
    sizes = sizes.to(device)
    ours_fn = PostProcessor(coder.to(device))
    # torchvision decodes against anchors in pixels of the image it clips to; anchors at the
    # original size spare it the separate resize step of its real pipeline.
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1).float()
    tv_anchors = list(anchors.xyxy.to(device)[None] * scale[:, None])
    tv_shapes = [tuple(s) for s in sizes.tolist()]
    fake_ssd = SimpleNamespace(
        box_coder=TV_CODER,
        score_thresh=0.01,
        nms_thresh=0.45,
        topk_candidates=200,
        detections_per_img=200,
    )

    def ours():
        return ours_fn(loc, logits, sizes)

    def theirs():
        head = {"bbox_regression": loc, "cls_logits": logits}
        return SSD.postprocess_detections(fake_ssd, head, tv_anchors, tv_shapes)

    passing = torch.softmax(logits, -1)[..., 1:] > 0.01
    groups = passing.any(1).sum().item() / batch
    same, max_score, max_box = compare_detections(ours(), theirs())
    count = sum(len(d["scores"]) for d in ours()) / batch
    note = (
        f"pairs > 0.01/image {passing.sum().item() / batch:.0f} "
        f"({passing.float().mean().item():.1%}), classes with one/image {groups:.1f}, "
        f"detections/image {count:.0f}; pools {pools_searched(ours_fn, ours)}; same sets: "
        f"{same} (max |d score| {max_score:.1e}, max |d box| {max_box:.1e} px)"
    )
    return {"ours": ours, "torchvision": theirs}, same, note


def pools_searched(post: PostProcessor, run: Callable[[], object]) -> str:
    """The pools one run searches, as 'pairs per image x images' (``PostProcessor.search``)."""
    pools = []
    search = post.search

    def recording(scores, pool, *args):
        pools.append(f"{pool} x {len(scores.best)}")
        return search(scores, pool, *args)

    post.search = recording
    try:
        run()
    finally:
        del post.search  # the method again
    return ", then ".join(pools)


def compare_detections(ours, theirs, atol_px=1e-2):
    """Equal as sets: (label, score) order on both sides, then element-wise differences."""
    same, max_score, max_box = True, 0.0, 0.0
    for o, t in zip(ours, theirs, strict=True):
        if len(o["scores"]) != len(t["scores"]):
            return False, float("inf"), float("inf")
        io = torch.argsort(o["labels"].double() * 2 + o["scores"].double())
        it = torch.argsort(t["labels"].double() * 2 + t["scores"].double())
        same &= bool(torch.equal(o["labels"][io], t["labels"][it]))
        if len(io):
            max_score = max(max_score, (o["scores"][io] - t["scores"][it]).abs().max().item())
            max_box = max(max_box, (o["boxes"][io] - t["boxes"][it]).abs().max().item())
    return same and max_box < atol_px and max_score < 1e-5, max_score, max_box


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    anchors = DefaultBoxes(300, FEATURE_MAPS, sizes=SIZES, steps=STEPS)
    coder = SSDBoxCoder(anchors.cxcywh).to(device)

    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}, "
        f"torch threads {torch.get_num_threads()}, {len(anchors)} default boxes, {args.objects} "
        f"GT/image; loss: batch {args.batch}, {args.classes} classes; post-processing: score "
        f"0.01, NMS 0.45, 200 candidates/class, 200 detections, batches {args.post_batches}; "
        f"median of {args.repeats} interleaved runs after {args.warmup} warm-up"
    )
    loss_fns, agree, note = bench_loss(args, device, gen, anchors, coder)
    print(f"[loss fwd+bwd] {note}")
    tasks = [("loss fwd+bwd", loss_fns, 2.0, agree, args.repeats)]
    workloads = [("random", classes, None) for classes in args.random]
    workloads += [("trained", int(c), float(p)) for c, p in (w.split(":") for w in args.realistic)]
    for name, classes, pairs in workloads:
        for batch in args.post_batches:
            if pairs is None:
                loc, logits = random_outputs(batch, classes, gen, anchors)
            else:
                loc, logits = trained_like_outputs(batch, classes, pairs, gen, coder, args.objects)
            fns, agree, note = bench_postprocess(loc, logits, device, gen, anchors, coder)
            task = f"post {name} C{classes} B{batch}"
            print(f"[{task}] {note}")
            repeats = args.repeats * (5 if batch == 1 else 1)
            tasks.append((task, fns, 1.0 if batch == 1 else 3.0, agree, repeats))
    medians = [interleaved_medians(fns, device, r, args.warmup) for _, fns, _, _, r in tasks]
    # Memory last: on CPU its measurement changes glibc's allocation policy for the process.
    memory = [{name: peak_memory_mib(fn, device) for name, fn in t[1].items()} for t in tasks]
    rows = [
        (task, med, mem, target, agree)
        for (task, _, target, agree, _), med, mem in zip(tasks, medians, memory, strict=True)
    ]

    print()
    header = (
        f"{'task':<24}{'ours ms':>10}{'tv ms':>10}{'ours/tv':>9}{'speed-up':>10}"
        f"{'target':>9}{'met':>5}{'ours MiB':>10}{'tv MiB':>9}{'agree':>7}"
    )
    print(header)
    print("-" * len(header))
    for task, med, mem, target, agree in rows:
        ratio = med["ours"] / med["torchvision"]
        speedup = 1.0 / ratio
        print(
            f"{task:<24}{med['ours']:>10.1f}{med['torchvision']:>10.1f}{ratio:>9.2f}"
            f"{speedup:>9.1f}x{f'>={target:g}x':>9}{'yes' if speedup >= target else 'NO':>5}"
            f"{mem['ours']:>10.0f}{mem['torchvision']:>9.0f}{'yes' if agree else 'NO':>7}"
        )
    batched = [
        med["torchvision"] / med["ours"]
        for task, med, *_ in rows
        if task.startswith("post") and not task.endswith(" B1")
    ]
    if batched:
        met = sum(speedup >= 3.0 for speedup in batched)
        print(
            f"post-processing >= 3x faster at batch > 1: met in {met} of {len(batched)} rows "
            f"(lowest {min(batched):.1f}x)"
        )
    kind = "CUDA allocator peak" if device.type == "cuda" else "peak RSS added by one call"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"memory columns: {kind}; process max RSS {maxrss:.0f} MiB")


if __name__ == "__main__":
    main()
