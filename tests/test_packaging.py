"""What `pip install fcn` gives a user: every package fcn's code needs is a declared dependency, and
requirements.txt (the `make test` environment) pins each one within pyproject's range."""

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Needed at run time but imported by a dependency only when asked, so not seen in fcn's own imports:
# jax.export's Exported.serialize (the kept training step, fcn/traced.py; fcn.export's model.jax) imports
# flatbuffers, which jax does not require. Without it a fresh install's first training step failed.
LAZY = {"flatbuffers"}
# jax requires (and pins) jaxlib, whose version is jax's to choose.
VIA = {"jaxlib": "jax"}


def _names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _imported_modules() -> set[str]:
    """Top-level names of every absolute import in fcn/, at module level or inside functions."""
    found = set()
    for path in (ROOT / "fcn").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"fcn", "__future__"}


def test_every_package_fcn_needs_is_declared():
    base = _names(PROJECT["dependencies"])
    tfds = _names(PROJECT["optional-dependencies"]["tfds"])  # imported only for TFDS data and the TF export
    providers = importlib.metadata.packages_distributions()
    needed = {}
    for module in _imported_modules():
        assert module in providers, f"fcn imports {module}, which no installed distribution provides"
        needed[module] = canonicalize_name(providers[module][0])
    undeclared = {m: d for m, d in needed.items() if d not in base | tfds and not (d in VIA and VIA[d] in base)}
    assert not undeclared, f"imported by fcn but not in pyproject's dependencies: {undeclared}"
    assert LAZY <= base, f"needed at run time but not in pyproject's dependencies: {sorted(LAZY - base)}"


def test_requirements_pin_every_dependency_within_its_range():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    extras = PROJECT["optional-dependencies"]
    for spec in PROJECT["dependencies"] + extras["tfds"] + extras["test"] + extras["cpu"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.txt does not pin {req.name} (pyproject: {spec})"
        assert req.specifier.contains(pins[name], prereleases=True), f"requirements.txt's {name}=={pins[name]}: {spec}"


def test_tf_exports_without_tensorflow_name_the_extra_in_one_line(tmp_path, monkeypatch, capsys):
    import fcn.export

    monkeypatch.setattr(fcn.export, "tensorflow_available", lambda: False)
    out, missing = tmp_path / "exported", str(tmp_path / "no-run")  # refused before the workdir is read
    assert fcn.export.main(["--workdir", missing, "--out", str(out), "--tflite_size", "24,32"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: --tflite_size needs tensorflow, which is not installed: pip install tensorflow-cpu "
        "(in fcn's checkout: pip install '.[tfds]')"
    ]
    assert fcn.export.main(["--workdir", missing, "--out", str(out)]) == 1  # the jax export goes on, with a note
    assert capsys.readouterr().err.splitlines()[0] == (
        "note: tensorflow is not installed, so no SavedModel: pip install tensorflow-cpu (in fcn's checkout: "
        "pip install '.[tfds]')"
    )
    assert not out.exists()


def test_a_missing_config_file_says_what_a_config_file_is(tmp_path):
    from fcn.cli import _load_config_file

    # an installed fcn has no configs/ folder to point at
    with pytest.raises(ValueError, match=r"no such file; .*get_config\(\) returns fcn\.config\.default_config\(\)"):
        _load_config_file(None, str(tmp_path / "configs" / "tiny.py"))
