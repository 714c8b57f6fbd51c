"""fcn/config.py's default_config() documents every field once, in a comment beside its default (or in the
comment lines just above it); a field whose value validate() restricts to a list names that list there; and
fcn/saved_config.py names each field as one of the first config's or one added later, with its value for older
runs."""

import inspect
import io
import json
import re
import tokenize

import ml_collections

from fcn import config as config_lib, saved_config

SECTIONS = {"c": "", "d": "data.", "a": "augment.", "m": "model.", "lo": "loss.", "o": "optimizer."}
ASSIGN = re.compile(r"^\s*(\w+)\.(\w+) = (?!\w+ = )")  # `d.path = ...`, not a section's `c.data = d = ...`


def field_comments() -> dict[str, str]:
    """'section.field' -> its comment: the one on its line, after the comment lines just above it."""
    source = inspect.getsource(config_lib.default_config)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("# ")
    out, above = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        if line.strip().startswith("#"):
            above.append(comments[number])
            continue
        if (m := ASSIGN.match(line)) and m.group(1) in SECTIONS:
            out[SECTIONS[m.group(1)] + m.group(2)] = " ".join([*above, comments.get(number, "")]).strip()
        above = []
    return out


def fields(config, prefix: str = "") -> set[str]:
    """The fields of default_config(): a section's ConfigDict by its fields, a dict-valued field as one."""
    out = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and not prefix:
            out |= fields(value, f"{key}.")
        else:
            out.add(prefix + key)
    return out


def test_every_field_of_default_config_has_a_comment():
    comments = field_comments()
    assert set(comments) == fields(config_lib.default_config())  # the parse found each field, once
    assert [name for name, text in comments.items() if not text] == []


def test_a_field_restricted_to_choices_names_each_in_its_comment(monkeypatch):
    choices = {}
    choice = config_lib._choice
    monkeypatch.setattr(
        config_lib, "_choice", lambda config, key, valid: (choices.setdefault(key, valid), choice(config, key, valid))
    )
    config_lib.validate(config_lib.default_config())
    assert {"data.source", "model.norm", "model.pad_mode", "model.conv_impl", "loss.fused_head"} <= set(choices)
    comments = field_comments()
    unnamed = {
        key: [v for v in valid if not re.search(rf"(?<![\w+]){re.escape(v)}(?![\w+])", comments[key])]
        for key, valid in choices.items()
    }
    assert {key: missing for key, missing in unnamed.items() if missing} == {}


def test_the_first_and_later_fields_name_every_field_of_the_config():
    """A field added to fcn.config without a value for older runs' config.json (saved_config.LATER_FIELDS) would
    be read from them as ml_collections' AttributeError, wherever it was first used."""
    default = json.loads(config_lib.default_config().to_json())
    fields = {
        f"{s}.{k}" if isinstance(v, dict) else s
        for s, v in default.items()
        for k in (v if isinstance(v, dict) else [s])
    }
    named = {f"{s}.{k}" if s else k for s, keys in saved_config.FIRST_FIELDS.items() for k in keys.split()}
    assert named.isdisjoint(saved_config.LATER_FIELDS) and named | set(saved_config.LATER_FIELDS) == fields
