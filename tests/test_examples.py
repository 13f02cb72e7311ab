"""The example reports shipped beside the JSON Schemas follow them (README points users at both)."""

import json
from pathlib import Path

import jsonschema
import pytest

EVALUATION = Path(__file__).parents[1] / "evaluation"


@pytest.mark.parametrize("name", ["evaluate", "bench"])
def test_shipped_example_follows_its_schema(name):
    schema = json.loads((EVALUATION / "schemas" / f"{name}.schema.json").read_text())
    example = json.loads((EVALUATION / "examples" / f"{name}.example.json").read_text())
    jsonschema.validate(example, schema)
