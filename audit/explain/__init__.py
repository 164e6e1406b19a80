"""Attribution engine: CAM, Grad-CAM, Grad-CAM++, saliency, guided backprop and Guided Grad-CAM.

Layers may output (N, C, h, w) maps, channels-last (N, h, w, C) maps or (N, T, C) transformer
tokens; `layout` reads each as a map from the model itself (no user-written reshape).
"""

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
from audit.explain.errors import LayerError
from audit.explain.layers import (
    default_output,
    find_last_feature_layer,
    resolve_layer,
)
from audit.explain.layout import Layout, layer_layout

__all__ = [
    "CAM_METHODS",
    "METHODS",
    "PIXEL_METHODS",
    "CAMNotApplicableError",
    "Explanation",
    "LayerError",
    "Layout",
    "cam_boxes",
    "default_output",
    "explain",
    "explain_many",
    "find_last_feature_layer",
    "largest_component",
    "layer_layout",
    "mask_boxes",
    "normalize_maps",
    "resolve_layer",
]
