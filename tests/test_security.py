"""Nothing in the package unpickles: loading a checkpoint, config.json or a dataset cannot run code.

(Config files are Python and are executed by design; archive extraction is tested in test_extract.py.)
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fcn"
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {"torch.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "pd.read_pickle", "pandas.read_pickle"}
NUMPY_LOADS = {"np.load", "numpy.load", "jnp.load"}


def dotted(node: ast.AST) -> str:
    """'a.b.c' for a Name/Attribute chain, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return ""


def unpickling(source: str) -> list[str]:
    """Each import of a pickling module, unsafe loader call, allow_pickle not False, or np.load
    without allow_pickle=False, in Python source, as 'line N: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            allow = [k.value for k in node.keywords if k.arg == "allow_pickle"]
            if name in UNSAFE_CALLS or (name.split(".")[-1] in ("read_pickle", "loads") and "pickle" in name):
                found.append(f"line {node.lineno}: {name}(")
            elif any(not (isinstance(v, ast.Constant) and v.value is False) for v in allow):
                found.append(f"line {node.lineno}: {name}(allow_pickle=...)")
            elif name in NUMPY_LOADS and not allow:
                found.append(f"line {node.lineno}: {name}( without allow_pickle=False")
    return found


def test_package_source_never_unpickles():
    """Every module of fcn/ is free of pickle and of the loaders that fall back to it."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [f"{f.relative_to(PACKAGE.parent)} {p}" for f in files for p in unpickling(f.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "bad",
    [
        "import pickle",
        "from cloudpickle import loads",
        "import dill as d",
        "x = np.load(path)",
        "x = numpy.load(path, allow_pickle=True)",
        "x = np.load(path, allow_pickle=flag)",
        "state = torch.load(f)",
        "cfg = yaml.load(text, Loader=yaml.Loader)",
        "df = pd.read_pickle(p)",
    ],
)
def test_the_scan_finds_each_pattern(bad):
    """The scan is not vacuous: each way of unpickling is reported."""
    assert unpickling(bad)


def test_the_scan_allows_the_safe_forms():
    assert not unpickling("np.load(p, allow_pickle=False)\nyaml.safe_load(t)\njson.loads(s)\n# pickle in a comment\n")
