"""Pascal VOC annotation documents, written (no torch: the planner writes smoke runs' data with it;
:func:`ftcl.detection.data.parse_voc_xml` reads them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence


def voc_xml(filename: str, width: int, height: int, objects: Sequence[tuple[str, tuple[int, int, int, int]]],
            depth: int = 3, folder: str | None = None) -> str:
    """A Pascal VOC annotation of one image; ``objects`` are (class name, 0-based xyxy box), written as
    VOC's 1-based inclusive pixel boxes, none of them difficult."""
    root = ET.Element("annotation")
    if folder is not None:
        ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", depth)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x1, y1, x2, y2) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"
