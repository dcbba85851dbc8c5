"""Expression data: readers for FER2013 (CSV or folders), class folders, CK+
(with subject ids) and RAF-DB, all decoded once into one uint8 array."""
from fer_edge.data.classes import CANONICAL_CLASSES, FER2013_CLASSES, canonical_class, resolve_classes
from fer_edge.data.faceset import FaceSet
from fer_edge.data.readers import (
    load_dataset,
    read_fer2013_csv,
    read_image_folder,
    read_rafdb,
)

__all__ = [
    "CANONICAL_CLASSES",
    "FER2013_CLASSES",
    "canonical_class",
    "resolve_classes",
    "FaceSet",
    "load_dataset",
    "read_fer2013_csv",
    "read_image_folder",
    "read_rafdb",
]
