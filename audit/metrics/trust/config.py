"""The `[trust]` table of the audit config: which explanation sanity checks run, and how.

```toml
[trust]
enabled = true                    # false: no trust checks
samples = 64                      # seeded sample of the evaluation split; occlusion runs on all
faithfulness_samples = 16         # the first of those that deletion / insertion runs on (costly)
randomization_samples = 32        # the first of those that the randomization test runs on, at most
randomization_min_samples = 16    # it stops at this many (or a multiple) once every method's 95% CI is clear of the threshold
cascade_cuts = 4                  # maps measured after this many evenly spaced cascade steps
max_randomized_correlation = 0.5  # a method passes when its Spearman after the full cascade is below
steps = 10                        # deletion/insertion steps (10 = 10% of the pixels per step)
deletion_baseline = "zero"        # what deleted pixels become: "zero" (black), "blur" or "mean"
blur_sigma = 5.0                  # pixels; the blurred image insertion starts from and "blur" fills
occlusion_fills = ["mean"]        # "mean" (the image's mean colour; the gate reads it) and / or "blur"
occlusion_regions = "unions"      # "unions": protected and core (all regions if neither is named); "all": each one too
cascade = "block"                 # randomization step: "block" (a layer and its norm) or "module"
batch_size = 32                   # images explained per pass (at most explain.batch_size)
```

The defaults are chosen for cost (docs/benchmarks.md has the measured figures): each occluded
region and fill costs two forwards per image, so the default occludes only what is read (the
protected union with the mean fill for the gate, the core union beside it in the report); raise
the sample sizes for tighter intervals, add "blur" or "all" for the fuller picture.
The checks stream: each batch of the sample is explained, randomized, perturbed and occluded,
and only a few numbers per image are kept, so memory does not grow with the sample sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audit.errors import ConfigError

DELETION_BASELINES = ("zero", "blur", "mean")
OCCLUSION_FILLS = ("mean", "blur")
OCCLUSION_REGIONS = ("unions", "all")
CASCADES = ("block", "module")


def _config_error(message: str) -> ValueError:
    """The project's ConfigError (a ValueError), naming the key."""
    return ConfigError(message)


@dataclass
class TrustConfig:
    """Settings of the trust checks; `check()` raises one line naming the first bad key."""

    enabled: bool = True
    samples: int = 64
    faithfulness_samples: int = 16
    randomization_samples: int = 32
    randomization_min_samples: int = 16
    cascade_cuts: int = 4
    max_randomized_correlation: float = 0.5
    steps: int = 10
    deletion_baseline: str = "zero"
    blur_sigma: float = 5.0
    occlusion_fills: list[str] = field(default_factory=lambda: ["mean"])
    occlusion_regions: str = "unions"
    cascade: str = "block"
    batch_size: int = 32

    def check(self) -> None:
        """Raise ConfigError (a ValueError) naming the key, e.g. `trust.samples must be > 0, got 0`."""

        def fail(key: str, rule: str) -> None:
            raise _config_error(f"trust.{key} must be {rule}, got {getattr(self, key)!r}")

        if not isinstance(self.enabled, bool):
            fail("enabled", "true or false")
        for key in (
            "samples",
            "faithfulness_samples",
            "randomization_samples",
            "randomization_min_samples",
            "cascade_cuts",
            "steps",
            "batch_size",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(key, "an integer > 0")
        if self.steps > 1000:
            fail("steps", "at most 1000")
        threshold = self.max_randomized_correlation
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not (0.0 <= threshold <= 1.0)
        ):
            fail("max_randomized_correlation", "a number in [0, 1]")
        sigma = self.blur_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            fail("blur_sigma", "a number > 0 (pixels)")
        if self.deletion_baseline not in DELETION_BASELINES:
            fail("deletion_baseline", f"one of {', '.join(DELETION_BASELINES)}")
        fills = self.occlusion_fills
        if (
            not isinstance(fills, list)
            or not fills
            or any(f not in OCCLUSION_FILLS for f in fills)
            or len(set(fills)) != len(fills)
        ):
            fail("occlusion_fills", f"a non-empty list of distinct {' / '.join(OCCLUSION_FILLS)}")
        if self.occlusion_regions not in OCCLUSION_REGIONS:
            fail("occlusion_regions", f"one of {', '.join(OCCLUSION_REGIONS)}")
        if self.cascade not in CASCADES:
            fail("cascade", f"one of {', '.join(CASCADES)}")
