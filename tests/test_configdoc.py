"""docs/configuration.md is generated from the configuration models: the committed copy must be
the generated text, so that it cannot go stale."""

from pathlib import Path

from experiments import configdoc
from experiments.config import SECTIONS, ExperimentConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_committed_reference_is_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == configdoc.markdown(), (
        "docs/configuration.md is stale: python -m experiments.configdoc > docs/configuration.md")


def test_every_key_has_a_description():
    for model in (ExperimentConfig, *SECTIONS.values()):
        for name, field in model.model_fields.items():
            assert name in SECTIONS or field.description, (model.__name__, name)
        assert model.__doc__
