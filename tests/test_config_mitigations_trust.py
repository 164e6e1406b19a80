"""Config keys of the later stages: mitigations, trust checks and protected attributes."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.config import ConfigError, from_dict
from tests.conftest import write_config


def config(**model: object) -> dict:
    return {"model": [{"name": "m", "train_split": "train_biased", **model}]}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"mitigation": "dro"}, "unknown mitigation 'dro'; choose from none, group_balanced"),
        ({"mitigation": "group_dro", "dro_eta": 0}, "dro_eta"),
        ({"mitigation": "jtt", "jtt_upweight": 0.5}, "jtt_upweight must be >= 1"),
        ({"mitigation": "jtt", "jtt_epochs": 0}, "jtt_epochs must be an integer >= 1"),
        ({"mitigation": "right_reasons", "rrr_lambda": -1}, "rrr_lambda"),
    ],
)
def test_bad_mitigations_are_one_line_errors(model, message):
    with pytest.raises(ConfigError, match="model 'm': ") as error:
        from_dict(config(**model))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_mitigation_needs_training():
    raw = {"model": [{"name": "m", "checkpoint": "m.pt", "mitigation": "jtt"}]}
    with pytest.raises(ConfigError, match="it needs train_split"):
        from_dict(raw)


def test_resolved_mitigation_keys():
    spec = from_dict(config(mitigation="group_dro", dro_eta=0.05)).model[0]
    assert spec.mitigation_config().resolved() == {
        "mitigation": "group_dro",
        "dro_eta": 0.05,
        "dro_weight_decay": spec.dro_weight_decay,
        "dro_adjustment": spec.dro_adjustment,
    }


@pytest.mark.parametrize(
    ("trust", "message"),
    [
        ({"samples": 0}, "trust.samples must be an integer > 0, got 0"),
        (
            {"max_randomized_correlation": 1.5},
            "trust.max_randomized_correlation must be a number in [0, 1]",
        ),
        ({"steps": -3}, "trust.steps"),
        ({"faithfulness_samples": 0}, "trust.faithfulness_samples"),
        (
            {"occlusion_regions": "hair"},
            "trust.occlusion_regions must be one of unions, all, got 'hair'",
        ),
    ],
)
def test_bad_trust_keys_are_one_line_errors(trust, message):
    with pytest.raises(ConfigError) as error:
        from_dict(config() | {"trust": trust})
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"attributes": ["skin_tone"]}, "data.attributes: attribute 'skin_tone' is not in"),
        ({"min_cell_size": -1}, "data.min_cell_size must be >= 0"),
    ],
)
def test_bad_attribute_settings_fail_before_any_work(data, message, small_dataset, tmp_path):
    path = write_config(
        tmp_path / "audit.toml", small_dataset, data={"manifest": str(small_dataset), **data}
    )
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.toml"]
