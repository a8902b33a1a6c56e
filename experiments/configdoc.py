"""The configuration reference, generated from the models of ``experiments.config``.

    python -m experiments.configdoc > docs/configuration.md

``markdown()`` is that file (a test keeps the committed copy equal to it); ``schema_text()`` is the
same listing as plain text, appended to the docstring of ``experiments.config`` (``help()``).
Each key's documentation is its ``Field(description=...)``; its default is the model's, or the
``shown_default`` text where the default depends on other keys.
"""

import sys
import textwrap
from typing import NamedTuple


class Row(NamedTuple):
    key: str
    type: str
    default: str
    description: str


def _type_label(field) -> str:
    from .config import Label

    labels = [m for m in field.metadata if isinstance(m, Label)]
    label = labels[-1] if labels else getattr(field.annotation, "__name__", str(field.annotation))
    rules = [m.func.rule for m in field.metadata if getattr(getattr(m, "func", None), "rule", "")]
    return " ".join([label, *rules])


def _default(field) -> str:
    from .config import _toml_value

    shown = (field.json_schema_extra or {}).get("shown_default")
    if shown:
        return shown
    if field.default is None:
        return "not set"
    return _toml_value(field.default)


def rows(model) -> list[Row]:
    """One row per key of a section model (or the top-level keys of ``ExperimentConfig``)."""
    from .config import SECTIONS

    return [Row(name, _type_label(f), _default(f), f.description or "")
            for name, f in model.model_fields.items() if name not in SECTIONS]


def _sections():
    """(title, description, rows) of the top level, then of each section in file order."""
    from .config import SECTIONS, ExperimentConfig

    yield "Top level", "", rows(ExperimentConfig)
    for name, cls in SECTIONS.items():
        yield f"[{name}]", " ".join(cls.__doc__.split()), rows(cls)


HEADER = ("Every key is optional: an omitted key takes its default. Unknown keys and sections are "
          "errors. Relative file names are relative to the configuration file.")


def schema_text(width: int = 100) -> str:
    """The reference as plain text: ``  key : type, description [default]`` per key."""
    out = ["Schema (every key is optional; defaults in brackets; units in the descriptions)",
           "-" * 78]
    for title, about, section_rows in _sections():
        out.append("")
        out += textwrap.wrap(f"{title:<22} {about}", width, subsequent_indent=" " * 23) or [title]
        for r in section_rows:
            text = f"  {r.key:<20} : {r.type}, {r.description} [{r.default}]"
            out += textwrap.wrap(text, width, subsequent_indent=" " * 25)
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """``docs/configuration.md``."""
    out = ["# Experiment configuration", "",
           "<!-- Generated from the models in experiments/config.py by "
           "`python -m experiments.configdoc > docs/configuration.md`; do not edit. -->", "",
           "An experiment is one TOML file (`lensbench ... --config FILE`, or the name of a "
           "shipped one in `experiments/configs`); `--set KEY=VALUE` changes one key on the "
           "command line (a TOML value, e.g. `--set hmc.num_samples=2000`). " + HEADER, ""]
    for title, about, section_rows in _sections():
        out += [f"## {title}", ""]
        if about:
            out += [about, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |"
                for r in section_rows]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
