"""COCO's class names, in the label orders the published model zoos use."""

from __future__ import annotations

from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

# torchvision's detectors: labels 1..90 are COCO category ids 1..90; the ten ids COCO never
# used are "N/A" (label 0, the background, is not a class).
TORCHVISION_COCO_CLASSES: list[str] = list(
    MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:]
)

# detectron2's and mmdetection's COCO models: the 80 used categories by ascending id.
COCO_CLASSES: list[str] = [name for name in TORCHVISION_COCO_CLASSES if name != "N/A"]

# COCO's category id of each of those 80 (what COCO-format results and pycocotools expect).
COCO_CATEGORY_IDS: list[int] = [
    index + 1 for index, name in enumerate(TORCHVISION_COCO_CLASSES) if name != "N/A"
]
