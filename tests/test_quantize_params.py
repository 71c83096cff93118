"""The `quantize:` section of params: every profile carries it, and bad values name the field."""

from pathlib import Path

import pytest
import yaml

from tasks.errors import UserError
from tasks.params import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ["params.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))]


def _raw(**quantize):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["quantize"].update(quantize)
    return raw


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_gates_q8_0_as_the_issue_asks(profile):
    gates = load_params(ROOT / profile).quantize.gates
    assert (gates["Q8_0"].max_ppl_ratio, gates["Q8_0"].min_same_top) == (1.005, 0.98)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_measures_the_dtype_it_serves(profile):
    """A profile that deploys bf16 weights (the GPU profile) has the quantize stage measure bf16's quality."""
    params = load_params(ROOT / profile)
    if params.deploy.dtype == "bf16":
        assert "bf16" in params.quantize.ours
    if params.deploy.quant == "int8":
        assert "int8" in params.quantize.ours


@pytest.mark.parametrize("quantize, message", [
    ({"types": ["Q8_0", "Q3_K"]}, "quantize.types: unknown quant type 'Q3_K'"),
    ({"types": ["Q8_0", "Q8_0"]}, "quantize.types: a quant type is listed twice"),
    ({"types": ["F16"], "gates": {"Q8_0": {"max_ppl_ratio": 1.01}}},
     "quantize.gates.Q8_0: not a type this stage builds"),
    ({"gates": {"Q8_0": {"min_same_top": 1.5}}}, "quantize.gates.Q8_0.min_same_top"),
    ({"bf16": False, "gates": {"bf16": {"max_ppl_ratio": 1.01}}}, "quantize.gates.bf16: not a type this stage builds"),
    ({"name": "a/b"}, "quantize.name"),
])
def test_bad_values_name_the_field(quantize, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        parse_params(_raw(**quantize))
