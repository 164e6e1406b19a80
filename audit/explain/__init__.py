"""Attribution engine: CAM, Grad-CAM, Grad-CAM++, saliency, guided backprop and Guided Grad-CAM."""

from audit.explain.boxes import cam_boxes, largest_component, mask_boxes
from audit.explain.engine import (
    CAM_METHODS,
    METHODS,
    PIXEL_METHODS,
    CAMNotApplicableError,
    Explanation,
    explain,
    explain_many,
    normalize_maps,
)
from audit.explain.layers import default_output, find_last_feature_layer, resolve_layer

__all__ = [
    "CAM_METHODS",
    "METHODS",
    "PIXEL_METHODS",
    "CAMNotApplicableError",
    "Explanation",
    "cam_boxes",
    "default_output",
    "explain",
    "explain_many",
    "find_last_feature_layer",
    "largest_component",
    "mask_boxes",
    "normalize_maps",
    "resolve_layer",
]
