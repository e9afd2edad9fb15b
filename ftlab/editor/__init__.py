"""`ConfigEditor`: an ipywidgets form generated from the config schema, with method presets, validation as you type, and a button that writes a `%%finetune` cell or a file.

The package (each module exported from its notebook in `nbs/editor/`): `fields` (what the schema says about each
field, the form's sections, YAML in and out), `rows` (one row of widgets per key), `form` (every key of one schema
class, plus the keys no widget holds) and `editor` (`ConfigEditor`). It imports ipywidgets; the engine never
imports it.
"""
from .fields import MULTILINE, SECTIONS, SUGGESTIONS, FieldSpec, field_spec, section_of, to_yaml
from .editor import PRESETS, ConfigEditor

__all__ = ["ConfigEditor", "PRESETS", "SECTIONS", "SUGGESTIONS", "MULTILINE", "FieldSpec", "field_spec", "section_of",
           "to_yaml"]
