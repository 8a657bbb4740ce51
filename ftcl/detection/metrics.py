"""Detection metrics as pure functions (numpy and pycocotools; no torch, no files).

Inputs, one mapping per test image (array-likes; CPU tensors work too):

* ``targets[i]``: ``boxes`` (N, 4) xyxy, ``labels`` (N,) in 1..C, ``difficult`` (N,) bool;
* ``predictions[i]``: ``boxes`` (M, 4) xyxy, ``scores`` (M,), ``labels`` (M,) in 1..C.

Boxes are in ftcl's continuous 0-based convention (:mod:`ftcl.detection.data`): a VOC box with
1-based inclusive pixel indices ``(X1, Y1, X2, Y2)`` is stored as ``(X1 - 1, Y1 - 1, X2, Y2)``, as
Detectron2's VOC loader stores it. All results are percent; means are over the classes that have
at least one (non-difficult) box.

VOC07 family: ``voc07_AP50``, ``voc07_AP``, ``voc07_AP75``
    What the MoCo and FT papers report for VOC: Detectron2's ``PascalVOCDetectionEvaluator`` on a
    2007 test set. For each IoU threshold ``t = k / 100.0``, k = 50, 55, ..., 95 (its floats), every
    class is scored by ``voc_eval(..., ovthresh=t, use_07_metric=True)`` (py-faster-rcnn's port of
    the devkit) and ``mAP[t]`` is the mean over classes; ``voc07_AP`` is the mean of ``mAP[t]`` over
    the ten thresholds, ``voc07_AP50 = mAP[0.50]``, ``voc07_AP75 = mAP[0.75]``. ``voc_eval``, as
    re-implemented here (:func:`voc_class_curves`, :func:`voc07_ap`):

    * boxes go back to the devkit's pixel indices: ``+1`` on ``x1`` and ``y1`` of ground truth (the
      XML's integers, exactly) and of detections (Detectron2 adds 1 to ``xmin``, ``ymin`` when it
      exports them); widths, heights and intersections count ``+1`` pixel (:func:`voc_overlaps`).
      On the stored boxes this is the plain continuous IoU (``X2 - X1 + 1 = x2 - x1``), up to
      floating-point rounding, exactly for integer coordinates;
    * detections of a class are sorted by score, highest first, from image order then the
      detector's order within an image (the order of Detectron2's result file). Detectron2 sorts
      with ``np.argsort(-confidence)``, numpy's default unstable sort, whose order among tied scores
      is not Detectron2's to fix: it differs between numpy versions and CPUs (numpy 2 dispatches to
      x86-simd-sort on AVX-512 machines and to its scalar introsort elsewhere), and tied detections
      that differ in TP/FP change the AP. Here the sort is stable (``kind="stable"``): ties keep the
      file order, the one order that is the same on every machine, and one that Detectron2's sort is
      free to produce too; on scores without ties both orders are the same;
    * each detection takes the ground-truth box of its image with the largest IoU (the first of
      equal ones); with IoU ``> t`` (strictly) it is ignored if that box is difficult, a true
      positive if the box is not taken yet (then it is), a false positive otherwise; IoU ``<= t``
      or no box of the class in the image: false positive;
    * recall = cumulative TP / number of non-difficult boxes; precision = cumulative TP /
      max(cumulative TP + FP, eps);
    * AP = sum over ``t in np.arange(0.0, 1.1, 0.1)`` of max(precision at recall >= t) / 11 (0
      where recall never reaches t). Those floats are not the exact tenths (``np.arange`` gives
      0.30000000000000004, 0.6000000000000001, 0.7000000000000001), so a recall of exactly 0.3, 0.6
      or 0.7 does not count for those points: kept, as Detectron2 does it.

    Remaining differences with Detectron2's numbers:

    * Detectron2 writes detections to text files and reads them back: scores rounded to 3
      decimals, boxes (float32, after the ``+1``) to 0.1 pixel; the rounding turns near-equal scores
      into ties, which its unstable sort then orders as the machine's numpy does. Here the
      detector's own float values are used. Measured on randomised VOC-like sets
      (``tests/test_detection_metrics.py``: 200-260 images, 3 classes, boxes 20-300 px, jittered,
      duplicated, overlapping and false detections, about 3000 per class) with uniform random
      float32 scores (the worst case, thousands of detections on 1000 rounded values): with the
      ties of the rounded file in file order (a stable sort, the same on every machine) the
      rounding moved ``voc07_AP``/``AP50``/``AP75`` by up to 0.35 points and one class's AP at one
      threshold by up to 1.2; with Detectron2's own unstable order, which differs between
      machines, by up to 1.3 (numpy's introsort) or 2.0 (its AVX-512 sort) points on the summaries
      and 4.6 for one class at one threshold, in either direction (a tied true and false positive
      swapped at the head of a ranking take the precision of the recall-0 point from 1 to 1/2:
      100/11/2 = 4.5 points of that class's AP). With scores that follow the box quality (a
      logistic of the IoU plus noise) by at most 0.11 points on the summaries. Nearly all of it
      comes from the score rounding and the tie order; the 0.1-px box rounding alone moved
      ``voc07_AP`` by at most 0.02 points. Fed the same unrounded numbers, Detectron2's
      ``voc_eval`` and this code agree to 1e-9 (in fact exactly) per class and threshold, also
      with IoUs exactly at a threshold and with exact ties (ranked in file order by both).
    * A class without non-difficult box is left out of the means here (NaN); Detectron2 counts it
      as AP 0 (never the case on VOC07 test, where every class has boxes).

COCO family: ``coco_AP``, ``coco_AP50``, ``coco_AP75``
    pycocotools' ``COCOeval`` (bbox, all areas, 100 detections per image, 101-point interpolated
    precision, IoU .50:.05:.95), its ``stats[0:3]``: the COCO numbers of the papers. Difficult boxes
    enter as ``iscrowd`` regions (matched with COCO's crowd rule, neither counted nor penalised).

Both families are computed for every dataset; the stage records which one is primary.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Detectron2's thresholds: ``thresh / 100.0 for thresh in range(50, 100, 5)`` (these exact floats)
VOC_IOU_THRESHOLDS: tuple[float, ...] = tuple(k / 100.0 for k in range(50, 100, 5))
#: the summary keys of ``detection.json`` (percent), in display order
METRICS: tuple[str, ...] = ("voc07_AP50", "voc07_AP", "voc07_AP75", "coco_AP", "coco_AP50", "coco_AP75")
FAMILIES: tuple[str, ...] = ("voc07", "coco")
DEFINITIONS = (
    "voc07_AP50/voc07_AP/voc07_AP75: Detectron2's PascalVOCDetectionEvaluator (py-faster-rcnn voc_eval, "
    "VOC2007 11-point AP, +1-pixel box convention, IoU > t strictly, difficult boxes ignored), mean over "
    "classes at t = 0.50, mean over t = 0.50:0.05:0.95, and t = 0.75; coco_AP/coco_AP50/coco_AP75: "
    "pycocotools COCOeval bbox (101-point, IoU .50:.05:.95, 100 detections per image, difficult boxes as "
    "crowd regions); percent, means over classes with boxes; unrounded detector scores and boxes"
)
_EPS = np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------ VOC07
def voc07_ap(recall: Sequence[float], precision: Sequence[float]) -> float:
    """VOC2007 11-point interpolated AP, exactly as Detectron2's ``voc_ap(rec, prec, use_07_metric=True)``:
    the sum over ``t in np.arange(0.0, 1.1, 0.1)`` of the highest precision at a recall ``>= t`` (0 when
    the recall never reaches t), each divided by 11. See the module doc for the float thresholds."""
    rec, prec = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        reached = rec >= t
        p = np.max(prec[reached]) if np.sum(reached) else 0
        ap = ap + p / 11.0
    return float(ap)


def voc_pixels(boxes: Any) -> np.ndarray:
    """ftcl's 0-based continuous xyxy boxes as the devkit's 1-based pixel indices (float64): ``+1`` on
    ``x1`` and ``y1``. Exact for float32 inputs (no rounding happens)."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, :2] += 1.0
    return out


def voc_overlaps(detections: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """IoU of every detection (rows) with every ground-truth box (columns), both in the devkit's pixel
    indices, with the ``+1`` pixel widths of ``voc_eval`` (the same operations in the same order)."""
    bb, gt = detections[:, None, :], ground_truth[None, :, :]
    ixmin = np.maximum(gt[..., 0], bb[..., 0])
    iymin = np.maximum(gt[..., 1], bb[..., 1])
    ixmax = np.minimum(gt[..., 2], bb[..., 2])
    iymax = np.minimum(gt[..., 3], bb[..., 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = ((bb[..., 2] - bb[..., 0] + 1.0) * (bb[..., 3] - bb[..., 1] + 1.0)
           + (gt[..., 2] - gt[..., 0] + 1.0) * (gt[..., 3] - gt[..., 1] + 1.0) - inters)
    return inters / uni


def voc_class_curves(
    image_ids: Sequence[int], scores: Sequence[float], boxes: Any,
    ground_truth: Mapping[int, tuple[Any, Any]], thresholds: Sequence[float] = VOC_IOU_THRESHOLDS,
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Recall and precision curves of one class at each IoU threshold, as ``voc_eval`` computes them.

    ``image_ids``, ``scores``, ``boxes``: the class's detections (0-based boxes), in image order;
    ``ground_truth``: image -> ``(boxes, difficult)`` of the class (0-based boxes; an image left out
    has none). None when the class has no non-difficult box. The best-overlapping box of each
    detection does not depend on the threshold, so it is found once; the greedy matching of the
    devkit then reduces to: among the detections with IoU > t on a non-difficult box, the first one
    in score order takes the box (true positive), the later ones are false positives.
    """
    gt = {img: (voc_pixels(b), np.asarray(d, dtype=bool).reshape(-1)) for img, (b, d) in ground_truth.items()}
    npos = int(sum((~d).sum() for _, d in gt.values()))
    if npos == 0:
        return None
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    confidence = np.asarray(scores, dtype=np.float64).reshape(-1)
    # stable: ties keep the input order on every machine (Detectron2's unstable argsort does not; module doc)
    order = np.argsort(-confidence, kind="stable")
    image_ids, bb = image_ids[order], voc_pixels(boxes)[order]
    nd = len(image_ids)
    ovmax = np.full(nd, -np.inf)
    box_key = np.full(nd, -1, dtype=np.int64)  # a global index of the best-overlapping box
    hard = np.zeros(nd, dtype=bool)
    offsets, offset = {}, 0
    for img, (g, _) in gt.items():
        offsets[img], offset = offset, offset + len(g)
    for img in np.unique(image_ids):
        g, difficult = gt.get(int(img), (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(g) == 0:
            continue
        rows = np.flatnonzero(image_ids == img)
        overlaps = voc_overlaps(bb[rows], g)
        jmax = np.argmax(overlaps, axis=1)
        ovmax[rows] = np.max(overlaps, axis=1)
        box_key[rows] = offsets[int(img)] + jmax
        hard[rows] = difficult[jmax]
    curves = []
    for t in thresholds:
        hit = ovmax > t
        fp = (~hit).astype(np.float64)
        candidates = np.flatnonzero(hit & ~hard)
        _, first = np.unique(box_key[candidates], return_index=True)
        tp = np.zeros(nd)
        tp[candidates[first]] = 1.0
        fp[candidates] = 1.0 - tp[candidates]
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, _EPS)
        curves.append((rec, prec))
    return curves


def voc_precision_recall(
    detections: Sequence[tuple[int, float, Any]], ground_truth: Mapping[int, tuple[Any, Any]],
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Recall and precision of one class at one threshold; ``detections``: ``(image, score, box)``
    (see :func:`voc_class_curves`)."""
    boxes = np.array([np.asarray(b, dtype=np.float64) for _, _, b in detections]).reshape(-1, 4)
    curves = voc_class_curves([i for i, _, _ in detections], [s for _, s, _ in detections], boxes,
                              ground_truth, (iou_threshold,))
    return None if curves is None else curves[0]


def voc_ap_per_class(targets: Sequence[Mapping], predictions: Sequence[Mapping], num_classes: int,
                     thresholds: Sequence[float] = VOC_IOU_THRESHOLDS) -> np.ndarray:
    """VOC07 11-point AP (fraction) of classes 1..C at each threshold: ``C x len(thresholds)``, NaN
    for a class without non-difficult box."""
    image_ids, scores, boxes, labels = [], [], [], []
    for i, p in enumerate(predictions):
        lab = np.asarray(p["labels"]).reshape(-1)
        image_ids.append(np.full(len(lab), i, dtype=np.int64))
        scores.append(np.asarray(p["scores"], dtype=np.float64).reshape(-1))
        boxes.append(np.asarray(p["boxes"]).reshape(-1, 4))
        labels.append(lab)
    image_ids, scores = np.concatenate([np.zeros(0, np.int64), *image_ids]), np.concatenate([np.zeros(0), *scores])
    boxes, labels = np.concatenate([np.zeros((0, 4)), *boxes]), np.concatenate([np.zeros(0, np.int64), *labels])
    result = np.full((num_classes, len(thresholds)), np.nan)
    for c in range(1, num_classes + 1):
        ground_truth = {}
        for i, t in enumerate(targets):
            keep = np.asarray(t["labels"]).reshape(-1) == c
            if keep.any():
                ground_truth[i] = (np.asarray(t["boxes"]).reshape(-1, 4)[keep],
                                   np.asarray(t["difficult"], dtype=bool).reshape(-1)[keep])
        mine = labels == c
        curves = voc_class_curves(image_ids[mine], scores[mine], boxes[mine], ground_truth, thresholds)
        if curves is not None:
            result[c - 1] = [voc07_ap(rec, prec) for rec, prec in curves]
    return result


# ------------------------------------------------------------------------------------------- COCO
def coco_ap_per_class(targets: Sequence[Mapping], predictions: Sequence[Mapping],
                      num_classes: int) -> np.ndarray:
    """COCO AP (fraction) of classes 1..C at IoU .50:.05:.95 (``C x 10``) from pycocotools' COCOeval
    (bbox, all areas, 100 detections per image, 101-point interpolation).

    Difficult boxes enter as ``iscrowd`` regions, which COCOeval neither counts nor penalises
    detections on. NaN for a class without boxes; 0 everywhere when there is no detection at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations = [], []
    for i, t in enumerate(targets):
        images.append({"id": i + 1})
        boxes, labels = np.asarray(t["boxes"]).reshape(-1, 4), np.asarray(t["labels"]).reshape(-1)
        for box, label, hard in zip(boxes, labels, np.asarray(t["difficult"]).reshape(-1)):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(hard)})
    has_boxes = np.isin(np.arange(1, num_classes + 1), [a["category_id"] for a in annotations])
    results = [{"image_id": i + 1, "category_id": int(lab), "score": float(s),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for i, p in enumerate(predictions)
               for b, s, lab in zip(np.asarray(p["boxes"]).reshape(-1, 4), np.asarray(p["scores"]).reshape(-1),
                                    np.asarray(p["labels"]).reshape(-1))]
    if not results:
        return np.where(has_boxes[:, None], 0.0, np.nan) * np.ones((1, 10))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in range(1, num_classes + 1)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # T x R x K, area "all", 100 detections
    valid = (precision > -1).all(axis=1)
    ap = np.where(valid, np.where(precision > -1, precision, 0).mean(axis=1), np.nan)
    return ap.T


# ---------------------------------------------------------------------------------------- summary
def evaluate_detections(targets: Sequence[Mapping], predictions: Sequence[Mapping],
                        classes: Sequence[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Both families (:data:`METRICS`, percent) and one row per class (``class``, ``num_boxes``: the
    non-difficult boxes, then :data:`METRICS`; NaN for a class without boxes)."""
    voc = 100.0 * voc_ap_per_class(targets, predictions, len(classes))
    coco = 100.0 * coco_ap_per_class(targets, predictions, len(classes))
    fifty, seventy_five = VOC_IOU_THRESHOLDS.index(0.5), VOC_IOU_THRESHOLDS.index(0.75)
    counts = np.zeros(len(classes), dtype=int)
    for t in targets:
        labels = np.asarray(t["labels"]).reshape(-1)[~np.asarray(t["difficult"], dtype=bool).reshape(-1)]
        counts += np.bincount(labels.astype(np.int64), minlength=len(classes) + 1)[1:len(classes) + 1]
    rows = [{"class": name, "num_boxes": int(counts[k]),
             "voc07_AP50": voc[k, fifty], "voc07_AP": voc[k].mean(), "voc07_AP75": voc[k, seventy_five],
             "coco_AP": coco[k].mean(), "coco_AP50": coco[k, 0], "coco_AP75": coco[k, 5]}
            for k, name in enumerate(classes)]
    map_at = [_nanmean(voc[:, j]) for j in range(len(VOC_IOU_THRESHOLDS))]  # Detectron2's mAP[t]
    summary = {"voc07_AP50": map_at[fifty], "voc07_AP": float(np.mean(map_at)), "voc07_AP75": map_at[seventy_five],
               "coco_AP": _nanmean(coco.mean(axis=1)), "coco_AP50": _nanmean(coco[:, 0]),
               "coco_AP75": _nanmean(coco[:, 5])}
    return summary, rows


def _nanmean(values: np.ndarray) -> float:
    """Mean over the classes that have boxes (NaN when none has)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan
