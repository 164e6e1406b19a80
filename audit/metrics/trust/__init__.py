"""Can the explanations be trusted? Sanity checks (randomization), faithfulness (deletion /
insertion) and the causal region test (occlusion), batched in torch. See each module's docstring."""

from audit.metrics.trust.config import TrustConfig
from audit.metrics.trust.faithfulness import deletion_insertion, faithfulness_summary
from audit.metrics.trust.occlusion import (
    occlusion_columns,
    occlusion_difference,
    occlusion_summary,
    region_occlusion,
)
from audit.metrics.trust.ops import gaussian_blur, spearman_rows, ssim_rows
from audit.metrics.trust.randomization import (
    CascadeResult,
    cascade_steps,
    randomization_cascade,
    randomization_summary,
    randomization_test,
)

__all__ = [
    "CascadeResult",
    "TrustConfig",
    "cascade_steps",
    "deletion_insertion",
    "faithfulness_summary",
    "gaussian_blur",
    "occlusion_columns",
    "occlusion_difference",
    "occlusion_summary",
    "randomization_cascade",
    "randomization_summary",
    "randomization_test",
    "region_occlusion",
    "spearman_rows",
    "ssim_rows",
]
