"""Datasets, decoding and annotation checks (sample contract: see ``data.dataset``)."""

from ssd_lightning.data.coco import COCODataset
from ssd_lightning.data.dataset import DetectionDataset
from ssd_lightning.data.images import ImageReadError, read_image
from ssd_lightning.data.records import AnnotationRecords
from ssd_lightning.data.shapes import SHAPE_CLASSES, ShapesDataset, ensure_shapes, generate_shapes
from ssd_lightning.data.validation import BadSampleError, DatasetReport
from ssd_lightning.data.voc import VOCDataset
from ssd_lightning.data.yolo import YOLODataset

__all__ = [
    "SHAPE_CLASSES",
    "AnnotationRecords",
    "BadSampleError",
    "COCODataset",
    "DatasetReport",
    "DetectionDataset",
    "ImageReadError",
    "ShapesDataset",
    "VOCDataset",
    "YOLODataset",
    "ensure_shapes",
    "generate_shapes",
    "read_image",
]
