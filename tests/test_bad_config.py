"""Bad input through the command line: a one-line message naming the key, value or file, a non-zero
exit, no traceback, and nothing written (the workdir is not even created) or changed.

The loaders' own checks are tested in test_images.py and test_data_sources.py; here each mistake
goes through train.py as `python train.py` runs it, in a process of its own forked from one that has
imported JAX (tests/forked.py: the same output and exit code, without 2-3 s of start-up each), and one
through a `python train.py` started afresh. The runs fail before any compilation, so they run side by side.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import forked
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ["--config.data.source=folder", "--config.data.path={data}", '--config.data.class_names=("bg","object")']

# id: (overrides on top of configs/tiny.py, what stderr must name)
CASES = {
    "unknown nested key": (
        ["--config.optimizer.learning_rat=1e-3"],
        ["error: --config.optimizer.learning_rat: not a config field (did you mean learning_rate?)"],
    ),
    "stray argument": (["runs/other"], ["error: unexpected arguments: runs/other"]),
    "text for an int": (["--config.batch_size=abc"], ["--config.batch_size=abc", "invalid literal for int()"]),
    "text for a float": (["--config.optimizer.learning_rate=fast"], ["--config.optimizer.learning_rate=fast"]),
    "float for an int": (["--config.model.features=2.5"], ["--config.model.features=2.5"]),
    "zero learning rate": (["--config.optimizer.learning_rate=0"], ["config.optimizer.learning_rate=0.0", "positive"]),
    "negative learning rate": (["--config.optimizer.learning_rate=-1e-3"], ["config.optimizer.learning_rate=-0.001"]),
    # Accepted before, and trained: on NaN weights from the second step, with an inverted-image jitter, with an
    # SGD momentum that pushes each update back.
    "NaN learning rate": (["--config.optimizer.learning_rate=nan"], ["learning_rate=nan must be a finite, positive"]),
    "infinite gradient clip": (["--config.optimizer.grad_clip=inf"], ["grad_clip=inf must be a finite, non-negative"]),
    "negative momentum": (["--config.optimizer.momentum=-1"], ["config.optimizer.momentum=-1.0 must be in [0, 1)"]),
    "contrast past 1": (["--config.augment.contrast=5"], ["config.augment.contrast=5.0 must be in [0, 1]"]),
    "negative max size": (["--config.data.max_size=-5"], ["config.data.max_size=-5", "non-negative"]),
    "unknown choice": (["--config.data.source=camvidd"], ["config.data.source='camvidd'", "camvid, folder"]),
    "unknown conv_impl": (["--config.model.conv_impl=fast"], ["config.model.conv_impl='fast'", "gemm, onednn, auto"]),
    "unknown pad mode": (["--config.model.pad_mode=mirror"], ["config.model.pad_mode='mirror'", "reflect"]),
    "no checkpoint kept": (["--config.keep_checkpoints=0"], ["config.keep_checkpoints=0", "at least 1"]),
    "negative ignore label": (["--config.data.ignore_label=-1"], ["config.data.ignore_label=-1", "0..255"]),
    "negative seed": (["--config.seed=-1"], ["config.seed=-1 must be an integer in 0..4294967295"]),
    "seed over 32 bits": (["--config.seed=4294967296"], ["config.seed=4294967296 must be an integer in 0..4294967295"]),
    "ignore label a class id": (
        ["--config.data.ignore_label=2"],
        ["data.ignore_label=2 must be in 4..255 (not a class id"],
    ),
    # Tuples take any values from the command line; these were tracebacks, the last one
    # after a workdir was made.
    "one scale": (["--config.augment.scale_range=(1.0,)"], ["config.augment.scale_range=(1.0,)", "two numbers"]),
    "text crop size": (["--config.augment.crop_size=('a','b')"], ["config.augment.crop_size=('a', 'b')"]),
    "one synthetic size": (["--config.data.synthetic_size=(24,)"], ["data.synthetic_size=(24,)", "H, W"]),
    "fractional crop size": (["--config.augment.crop_size=(23.5,32)"], ["crop_size=(23.5, 32) must be two positive"]),
    "unknown train split": (["--config.data.train_split=trian"], ["config.data.train_split='trian'", "train, val"]),
    "crop larger than images": (
        ["--config.augment.crop_size=(64,64)"],
        ["config.augment.crop_size=(64, 64)", "30 x 40"],
    ),
    # crop_size is in network pixels: input_scale alone made the tiny config's crop too large, and the
    # message's image size (15 x 20) did not say it was the images' at that scale
    "crop larger than images at input_scale": (
        ["--config.model.input_scale=0.5"],
        ["config.augment.crop_size=(24, 32)", "15 x 20, in network pixels at config.model.input_scale=0.5"],
    ),
    "batch larger than dataset": (["--config.batch_size=32"], ["config.batch_size=32", "16 training examples"]),
    "one class": ([*FOLDER[:2], '--config.data.class_names=("only",)'], ["data.class_names=('only',)", "at least 2"]),
    "corrupt image": (FOLDER, ["{data}/images/im03.png: not an image"]),
    # A config file of CONFIG_FILES in place of configs/tiny.py
    "no config file": (["--config={configs}/nowhere.py"], ["--config={configs}/nowhere.py: no such file"]),
    "config syntax error": (["--config={configs}/syntax.py"], ["{configs}/syntax.py, line 1: SyntaxError"]),
    "config raises": (["--config={configs}/raises.py"], ["raises.py: line 2: RuntimeError: no GPU here"]),
    "no get_config": (["--config={configs}/no_get_config.py"], ["no_get_config.py: the file defines no get_config()"]),
    "get_config returns a dict": (
        ["--config={configs}/dict.py"],
        ["dict.py: get_config() returned dict, not a ConfigDict"],
    ),
    "misspelt field in a config file": (
        ["--config={configs}/misspelt.py"],
        ["config.optimizer.learning_rat is not a config field (did you mean learning_rate?)"],
    ),
}
CONFIG_FILES = {
    "syntax.py": "def get_config(:\n",
    "raises.py": "def get_config():\n    raise RuntimeError('no GPU here')\n",
    "no_get_config.py": "CONFIG = None\n",
    "dict.py": "def get_config():\n    return {'seed': 0}\n",
    "misspelt.py": "from configs import tiny\n\ndef get_config():\n    c = tiny.get_config()\n"
    "    c.optimizer.learning_rat = 1e-2\n    return c\n",
}
# Exit code 2: the command line itself (docs/reliability.md); every other case is a config value or the data: 1.
COMMAND_LINE = {
    "unknown nested key",
    "stray argument",
    "text for an int",
    "text for a float",
    "float for an int",
    "no config file",
    "config syntax error",
    "config raises",
    "no get_config",
    "get_config returns a dict",
}


def make_folder(root: Path) -> Path:
    """Six 24x32 image/mask pairs, im03.png not an image at all."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray((rng.random((24, 32)) > 0.5).astype(np.uint8)).save(root / "masks" / f"im{i:02d}.png")
    (root / "images" / "im03.png").write_bytes(b"this is not a PNG")
    return root


def snapshot(root: Path) -> dict:
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's train.py run, forked side by side; (results, data folder, snapshots, config folder), each
    result (process, workdir). Also "camvid with class_names", for test_a_data_setting_the_source_never_reads."""
    base = tmp_path_factory.mktemp("bad_config")
    data = make_folder(base / "data")
    before = snapshot(data)
    (base / "configs").mkdir()
    for name, text in CONFIG_FILES.items():
        (base / "configs" / name).write_text(text)
    (base / "camvid").mkdir()  # empty
    cases = {case: [o.format(data=data, configs=base / "configs") for o in CASES[case][0]] for case in CASES}
    cases["camvid with class_names"] = [
        "--config.data.source=camvid",
        f"--config.data.path={base / 'camvid'}",
        '--config.data.class_names=("a","b")',
    ]
    commands, workdirs = [], []
    for case, overrides in cases.items():
        workdirs.append(base / case.replace(" ", "_"))
        config = overrides.pop(0) if overrides[0].startswith("--config=") else "--config=configs/tiny.py"
        commands.append({"args": ["train.py", config, "--workdir", workdirs[-1], *overrides]})
    results = dict(zip(cases, zip(forked.run(commands, {"JAX_PLATFORMS": "cpu"}), workdirs)))
    return results, data, before, snapshot(data), base / "configs"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_writes_nothing(runs, case):
    results, data, before, after, configs = runs
    done, workdir = results[case]
    assert done.returncode == (2 if case in COMMAND_LINE else 1), done.stderr
    for needle in CASES[case][1]:
        assert needle.format(data=data, configs=configs) in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not workdir.exists()  # no checkpoint, no config.json, no empty folder
    assert after == before  # the user's images and masks: same bytes, same times


def test_folder_cases_reach_the_checks_they_name(runs):
    """The folder config is otherwise valid: with two class names it fails on the image, not before."""
    results, *_ = runs
    assert "im03.png" in results["corrupt image"][0].stderr and "class_names" not in results["corrupt image"][0].stderr


def test_an_empty_workdir_is_refused_not_taken_for_the_current_folder(tmp_path):
    """--workdir="$RUN" with RUN unset: Path("") is ".", where a whole run was written among the user's files."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}", "--workdir="]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: flag --workdir=: an empty path; name a directory for the run" in done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.data.max_size=-5", "config.data.max_size=-5 must be a non-negative number"),
        ("--config.data.ignore_label=300", "config.data.ignore_label=300 must be an integer in 0..255"),
        ("--config.data.storage=disk", "config.data.storage='disk' is not valid"),
    ],
)
def test_data_overrides_of_a_workdir_are_checked_as_train_py_checks_them(override, words):
    """`python -m fcn.evaluate --config.data.KEY=VALUE`: -5 evaluated images shrunk to a nonsense size, 300 was
    numpy's OverflowError; each is now the message train.py gives."""
    import json

    from ml_collections import ConfigDict

    from configs import tiny
    from fcn.cli import with_data_overrides
    from fcn.config import ConfigError

    def saved():  # as checkpoint.load_config reads config.json
        return ConfigDict(json.loads(tiny.get_config().to_json()))

    with pytest.raises(ConfigError, match=re.escape(words)):
        with_data_overrides(saved(), [override])
    assert with_data_overrides(saved(), ["--config.data.max_size=16"]).data.max_size == 16
    with pytest.raises(ValueError, match=re.escape("--config.data.pth: not a config field (did you mean path?)")):
        with_data_overrides(saved(), ["--config.data.pth=elsewhere"])


def test_a_data_setting_the_source_never_reads_is_refused_by_train_py(runs):
    """`--config.data.class_names` is read by the folder and tfds sources only: with CamVid it was ignored, and
    the run trained on CamVid's 11 classes without a word. Now one line names the key, its value and the
    source, before the data is looked for (the empty data folder would be an error of its own) or the workdir
    is made."""
    done, workdir = runs[0]["camvid with class_names"]
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [
        "error: config.data.class_names=('a', 'b') is read only by data.source='folder' or 'tfds'; this config's "
        "source is 'camvid', which would ignore it: leave it out, or set config.data.source"
    ], done.stderr
    assert "Traceback" not in done.stderr and not workdir.exists()


@pytest.mark.parametrize(
    "source, key, value",
    [
        ("synthetic", "path", "data"),  # the default source: trained on shapes, not on the folder named
        ("camvid", "val_fraction", 0.2),
        ("folder", "tfds_name", "voc"),
        ("tfds", "url", "https://example.org/camvid.zip"),
        ("camvid", "color_map", ((0, 0, 0), (255, 0, 0))),
    ],
)
def test_each_source_refuses_the_fields_it_never_reads(source, key, value):
    from fcn.config import ConfigError, default_config, validate_data

    config = default_config()
    config.data.source, config.data[key] = source, value
    with pytest.raises(ConfigError, match=re.escape(f"config.data.{key}={value!r} is read only by data.source=")):
        validate_data(config)
    config.data[key] = default_config().data[key]  # its default: as good as unset
    validate_data(config)


def test_a_shipped_synthetic_config_may_switch_to_another_source():
    """configs/tiny.py sets synthetic_size and synthetic_counts; with another source it is a tiny model on real
    data (tests/test_data_camvid.py), not a mistake."""
    from configs import tiny
    from fcn.config import validate_data

    config = tiny.get_config()
    config.data.source, config.data.cache_decoded = "tfds", False  # and tfds keeps no decoded cache anyway
    validate_data(config)


def test_every_shipped_config_sets_only_fields_its_source_reads():
    from fcn.config import default_config, validate_data

    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
    assert {"camvid", "camvid_cpu", "pets", "tiny"} <= set(names)
    for name in names:
        validate_data(__import__(f"configs.{name}", fromlist=["get_config"]).get_config())
    # and the README's own-folders command, on configs/default.py
    config = default_config()
    config.data.source, config.data.path, config.data.class_names = "folder", "DIR", ("background", "object")
    config.data.value_map = {"255": 1}
    validate_data(config)


def test_a_workdir_override_is_refused_where_its_source_never_reads_it_and_only_then():
    """`python -m fcn.evaluate --config.data.class_names=...` on a CamVid workdir was scored with CamVid's 11
    classes. Only the fields an override changes count: a field an older run saved, unread, blocks nothing."""
    import json

    from ml_collections import ConfigDict

    from configs import camvid_cpu
    from fcn.cli import with_data_overrides
    from fcn.config import ConfigError

    saved = ConfigDict(json.loads(camvid_cpu.get_config().to_json()))  # as checkpoint.load_config reads it
    with pytest.raises(ConfigError, match=re.escape("config.data.class_names=('a', 'b') is read only by")):
        with_data_overrides(saved, ['--config.data.class_names=("a","b")'])
    saved.data.class_names = ["x", "y"]  # trained before fields were checked against the source
    assert with_data_overrides(saved, ["--config.data.path=elsewhere"]).data.path == "elsewhere"
    switched = ["--config.data.source=folder", '--config.data.class_names=("a","b")']
    assert with_data_overrides(saved, switched).data.class_names == ("a", "b")


@pytest.mark.parametrize(
    "value, names",
    [
        ("bg,object", ("bg", "object")),  # was ('bg,object',): one class, or a wrong class list
        ("bg, object", ("bg", "object")),
        ("(bg,object)", ("bg", "object")),
        ("road-marking,sky,", ("road-marking", "sky")),
        ('("bg","object")', ("bg", "object")),  # the README's Python syntax, as before
        ("bg", ("bg",)),
        ('("a,b",)', ("a,b",)),  # a name with a comma, quoted
        ("", ()),  # was ('',)
    ],
)
def test_a_tuple_of_names_takes_comma_separated_values(value, names):
    """`--config.data.class_names=bg,object` is two names, in train.py (its config-file flag, as
    scripts/ablation.py parses it too) and in a workdir's data overrides (fcn.evaluate, fcn.predict);
    numbers still read as Python (`96,128`)."""
    import json

    from absl import flags
    from ml_collections import ConfigDict, config_flags

    from configs import tiny
    from fcn.cli import config_file_errors_in_one_line, with_data_overrides

    argv = ["train.py", f"--config={ROOT / 'configs' / 'tiny.py'}", f"--config.data.class_names={value}"]
    argv += ["--config.augment.crop_size=64,80"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    config_file_errors_in_one_line(values)
    values(argv)
    assert values.config.data.class_names == names and values.config.augment.crop_size == (64, 80)

    saved = ConfigDict(json.loads(tiny.get_config().to_json()))  # as checkpoint.load_config reads it
    overrides = ["--config.data.source=folder", f"--config.data.class_names={value}"]
    assert with_data_overrides(saved, overrides).data.class_names == names
