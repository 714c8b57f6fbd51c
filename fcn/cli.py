"""Command-line glue: readable errors instead of tracebacks, and exit codes."""

from __future__ import annotations

import functools
import logging
import sys


def run_training(config, workdir: str) -> int:
    """Train, turning the errors a user can act on into one message and exit code 1."""
    from fcn.checkpoint import CheckpointError
    from fcn.config import ConfigError
    from fcn.data.images import DataError
    from fcn.train import TrainingError, train_and_evaluate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "jax", "orbax", "tensorstore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # orbax logs a failed background save with its traceback; the error printed below says it in one line.
    logging.getLogger("absl").addFilter(_without_traceback)
    try:
        train_and_evaluate(config, workdir)
    except (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def out_of_memory(e: BaseException) -> str | None:
    """'ran out of memory on the CPU (it tried to allocate 1.32 TiB)' when `e` (or an exception it was raised
    from) is XLA's out-of-memory error, else None. XLA says it in several ways: `RESOURCE_EXHAUSTED: Out of
    memory allocating N bytes.` (CPU), `... Out of memory while trying to allocate N bytes.` and then pages of
    buffer statistics, `Failed to allocate request for 6.27GiB (6727663616B) on device ordinal 0` (GPU),
    `Attempting to allocate 16.00G. That was not possible.` (TPU, running), `XLA:TPU compile permanent error.
    Ran out of memory in memory space hbm. Used 21.95G of 15.48G hbm.` (TPU, compiling: 'the program needs
    21.95G; it has 15.48G')."""
    import re

    import jax

    while e is not None and not isinstance(e, jax.errors.JaxRuntimeError):
        e = e.__cause__
    text = str(e) if e is not None else ""
    if not re.search(r"out of memory|RESOURCE_EXHAUSTED.*(memory|allocat)", text, re.I | re.S):
        return None
    size = ""
    if found := re.search(r"(\d+) bytes|\((\d+)B\)", text):
        size = f" (it tried to allocate {format_bytes(int(found[1] or found[2]))})"
    elif found := re.search(r"allocate ([\d.]+ ?[KMGT]i?B?)", text):
        size = f" (it tried to allocate {found[1]})"
    elif found := re.search(r"Used ([\d.]+ ?[KMGT]i?B?) of ([\d.]+ ?[KMGT]i?B?) hbm", text):
        size = f" (the program needs {found[1]}; it has {found[2]})"
    return f"ran out of memory on the {jax.default_backend().upper()}{size}"


def format_bytes(n: int) -> str:
    """'1.32 TiB': `n` bytes in binary units, three significant digits."""
    power = max(0, min(5, (int(n).bit_length() - 1) // 10))
    return f"{n / 1024**power:.3g} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB')[power]}"


def less_memory(config, doing: str) -> str:
    """Training flags that take less device memory than `config`'s, for what ran out of it: fcn.train's `doing`
    (creating the model's state, in the training step, evaluating)."""
    import jax

    n_dev, m = jax.device_count(), config.model
    half = lambda n: max(n_dev, n // 2 // n_dev * n_dev)  # noqa: E731 - a batch divides among the devices
    if doing.startswith("evaluating"):
        flags = [f"--config.eval_batch_size={half(config.eval_batch_size)} (now {config.eval_batch_size})"]
        flags += ["--config.eval_hflip=False"] if config.eval_hflip else []
    else:
        (h, w), step = config.augment.crop_size, not doing.startswith("creating")
        flags = [f"--config.batch_size={half(config.batch_size)} (now {config.batch_size})"] if step else []
        flags += [f"--config.augment.crop_size=({max(1, h // 2)},{max(1, w // 2)}) (now ({h},{w}))"] if step else []
        flags += [f"--config.model.features={max(1, m.features // 2)} (now {m.features})"]
        flags += [f"--config.model.depth={m.depth - 1} (now {m.depth})"] if m.depth else []
        flags += ["--config.model.dtype=bfloat16"] if step and m.dtype != "bfloat16" else []
    return " or ".join(flags) if len(flags) < 3 else ", ".join(flags[:-1]) + " or " + flags[-1]


def retain_memory() -> bool:
    """fcn.host_memory.retain_freed_memory() unless FCN_RETAIN_MEMORY=0: a command's first call, before JAX's threads.

    On a 2-core CPU it takes about a third off the CamVid CPU training step
    (docs/benchmarks.md); elsewhere it only keeps freed host memory for reuse.
    """
    import os

    from fcn.host_memory import retain_freed_memory

    return os.environ.get("FCN_RETAIN_MEMORY", "1") != "0" and retain_freed_memory()


def out_dir_error(out: str) -> str | None:
    """Why `--out` cannot become a folder (empty, or a file at it or above it, in words), or None: checked
    before a command loads its model. An empty --out (a shell variable that was not set) would be the
    current directory."""
    from pathlib import Path

    if not str(out):
        return "--out is an empty path; name a folder for the outputs"
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"--out {out}: {blocker} is a file, not a directory"
    return None


def exits_130_on_ctrl_c(note: str = ""):
    """Decorates a command's main: Ctrl-C is one line, `interrupted (Ctrl-C)` and `note`, and exit code 130,
    not a traceback; and, once main has begun, it is not lost. Python's own handler raises KeyboardInterrupt
    in whatever code runs, and JAX runs a gc callback at every garbage collection (jax-ml/jax#18246), in
    which the exception was dropped: a Ctrl-C while a command started (data, the model's state) could do
    nothing at all."""

    def decorate(main):
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            import signal
            import threading

            # Python's handler only: an ignored SIGINT (a background job, nohup) stays ignored
            ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
            ours = ours and threading.current_thread() is threading.main_thread()  # else signal() refuses
            previous = signal.signal(signal.SIGINT, _on_sigint) if ours else None
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"interrupted (Ctrl-C){note}", file=sys.stderr, flush=True)
                raise SystemExit(130) from None
            finally:
                if ours:
                    signal.signal(signal.SIGINT, previous)

        return wrapped

    return decorate


def _on_sigint(signum, frame) -> None:
    """KeyboardInterrupt, as Python's handler raises it; inside a gc callback, once the callback has returned."""
    import _thread
    import gc
    import threading

    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks} - {None}
    while frame is not None:
        if frame.f_code in callbacks:  # raised here, the exception would be dropped: delivered again shortly
            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.", required=True)
    # An empty --workdir= (a shell variable that was not set) would be the current directory.
    flags.register_validator("workdir", lambda v: v != "", message="an empty path; name a directory for the run")
    config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
    config_file_errors_in_one_line(flags.FLAGS)
    flags.mark_flags_as_required(["config"])
    # Multi-process runs (see docs/distributed.md); unset, FCN_* variables or a detected cluster decide.
    flags.DEFINE_string("coordinator", None, "host:port of process 0 of a multi-process run (or FCN_COORDINATOR).")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run (or FCN_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1 (or FCN_PROCESS_ID).")
    # --help lists the main module's key flags only: without this, none of these (they are fcn.cli's).
    for name in ("config", "workdir", "coordinator", "num_processes", "process_id"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def config_file_errors_in_one_line(flag_values, name: str = "config") -> None:
    """Have the config-file flag `name` (ml_collections' DEFINE_config_file) raise a config file's own
    mistakes as a one-line flag error (`_load_config_file`), not a traceback; and its tuple overrides
    take comma-separated values (`tuples_take_commas`)."""
    tuples_take_commas()
    parser = flag_values[name].parser
    parser.parse = functools.partial(_load_config_file, parser.parse)


def tuples_take_commas() -> None:
    """Have ml_collections' `--config.KEY=VALUE` read a tuple field's `a,b` as ('a', 'b'), as absl's list
    flags do: it took `--config.data.class_names=road,sky`, not Python, for one name ('road,sky',). A value
    that is Python (`'("a", "b")'`, `96,128`, `'("a,b",)'` for one name with a comma) reads as before; an
    empty one is the empty tuple, not ('',). For every command's config flags, before they parse."""
    from ml_collections import config_flags
    from ml_collections.config_flags import tuple_parser

    class CommaTupleParser(tuple_parser.TupleParser):
        def parse(self, argument):
            return super().parse(_comma_separated(argument))

    config_flags.register_flag_parser_for_type(tuple, CommaTupleParser())


def _comma_separated(argument):
    """('a', 'b') for a string 'a, b' or '(a, b)' that is no Python literal (() for ''), else `argument`."""
    import ast

    if not isinstance(argument, str):
        return argument
    try:
        ast.literal_eval(argument)
        return argument
    except (ValueError, SyntaxError):
        pass
    items = argument.strip()
    if items[:1] + items[-1:] in ("()", "[]"):  # (a, b) without quotes
        items = items[1:-1]
    elif "," not in items and items:
        return argument  # one item: ml_collections' own reading
    return tuple(item.strip() for item in items.split(",") if item.strip())


def _load_config_file(parse, path: str):
    """`parse(path)` (ml_collections' loading of --config), with the config file's own mistakes in one line:
    a missing file, a syntax error, an exception in get_config() (with its line), no get_config(), a
    get_config() that returns no ConfigDict. absl puts "flag --config=PATH: " before the ValueError's words."""
    import os
    import traceback

    from ml_collections import ConfigDict

    file = path.split(":", 1)[0]  # FILE:ARG passes ARG to get_config
    if not os.path.isfile(file):
        raise ValueError(  # (an installed fcn has no configs/: say what one is)
            f"{'a directory' if os.path.isdir(file) else 'no such file'}; name a config file: a Python file whose "
            "get_config() returns fcn.config.default_config() with changes, as the repository's configs/*.py do"
        )
    try:
        config = parse(path)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything: said in one line
        if str(e).startswith("Error whilst parsing config file") and e.__context__ is not None:
            e = e.__context__  # ml_collections re-raised it with the traceback in its message
        if isinstance(e, SyntaxError):
            raise ValueError(f"{e.filename}, line {e.lineno}: SyntaxError: {e.msg}") from None
        lines = [
            f.lineno
            for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(file)
        ]
        if isinstance(e, AttributeError) and "get_config" in str(e) and not lines:
            raise ValueError("the file defines no get_config() function returning a ConfigDict") from None
        raise ValueError(f"{f'line {lines[-1]}: ' if lines else ''}{type(e).__name__}: {e}") from None
    if not isinstance(config, ConfigDict) and type(config).__name__ != "_ErrorConfig":  # (an OSError, said later)
        raise ValueError(
            f"get_config() returned {type(config).__name__}, not a ConfigDict: start from "
            "fcn.config.default_config(), as configs/*.py do"
        )
    return config


@exits_130_on_ctrl_c(": the same command resumes from the latest checkpoint, if one was saved")
def train_main(argv=None) -> None:
    """`python train.py --config FILE --workdir DIR [--config.key=value ...]`."""
    from absl import app, flags

    retain_memory()

    _define_flags()

    def main(argv):
        if len(argv) > 1:  # (app.UsageError printed the whole --help above it, with exit code 1)
            print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)", file=sys.stderr)
            return 2
        # app.run put absl's handler on the root logger, which prefixes every line with a level, time,
        # thread and file: plain messages instead, as run_training asks (it leaves a caller's handlers be).
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        from fcn.distributed import DistributedError, maybe_initialize

        try:  # first, before JAX touches a device
            maybe_initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except DistributedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            config = flags.FLAGS.config
            config.keys()  # the config file is loaded lazily: surface its errors here
        except OSError as e:  # an unreadable config file (its other mistakes are flag errors: _load_config_file)
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run_training(config, flags.FLAGS.workdir)

    app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl flag parsing, with config key errors as one line instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        print(f"error: {flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def flag_error(e: Exception, argv=()) -> str:
    """One line for an error parsing flags, --config.key=value overrides included: an unknown key is
    named by its whole flag, as `argv` spells it (`--config.model.haed: not a config field (did you
    mean head?)`), as a misspelt field of a config file is (fcn.config)."""
    if isinstance(e, (AttributeError, KeyError)):
        # ml_collections raises these for an unknown --config.key, naming the closest valid key:
        # "'haed' Did you mean \"head\" instead of \"haed\"?" (the name alone, not its path).
        import re

        msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        named = re.match(r"'?([^' ]+)'?(?: Did you mean \"([^\"]+)\")?", msg)
        flag = named and next((a.split("=")[0] for a in argv if _names_key(a, named[1])), None)
        if flag:
            return f"{flag}: not a config field" + (f" (did you mean {named[2]}?)" if named[2] else "")
        return f"unknown config key in the command line: {msg}"
    return str(e)


def _names_key(arg: str, key: str) -> bool:
    """Whether `arg` is a --config.a.b=value flag with `key` among a.b."""
    path = arg.lstrip("-").split("=")[0].split(".")
    return arg.startswith("-") and path[0] == "config" and key in path[1:]


DATA_OVERRIDE = "--config.data."


def is_data_override(arg: str) -> bool:
    """Whether a command-line argument is a `--config.data.KEY[=VALUE]` override (one dash or two)."""
    return arg.startswith("-") and arg.lstrip("-").startswith(DATA_OVERRIDE.lstrip("-"))


def with_data_overrides(config, overrides: list[str]):
    """`config` (a workdir's) with `--config.data.KEY=VALUE` overrides, parsed as train.py parses its own.

    For the commands that read a trained workdir's data (python -m fcn.evaluate): where and how the
    data is read may change (its path, a download URL), the model and training settings may not.
    ml_collections parses each value by the field's type; a ValueError names an unknown key (with
    the closest valid one) or a value the field cannot take.
    """
    if not overrides:
        return config
    others = [a for a in overrides if a.startswith("-") and not is_data_override(a)]
    if others:
        raise ValueError(f"{' '.join(others)}: only {DATA_OVERRIDE}KEY=VALUE overrides; the rest is the model's")
    from absl import flags
    from ml_collections import ConfigDict, config_flags

    from fcn.config import plain, validate_data

    # The workdir's config.json gave lists where the config file had tuples; ml_collections overrides tuples.
    config.data = ConfigDict(plain(config.data))
    before = plain(config.data)
    argv = ["fcn", *overrides]
    flag_values = flags.FlagValues()
    tuples_take_commas()
    try:  # (an unknown key fails already here, where ml_collections defines a flag per override)
        config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
        rest = flag_values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise ValueError(flag_error(e, argv)) from None
    if len(rest) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(rest[1:])}")
    after = plain(flag_values.config.data)
    # A ConfigError, a ValueError: --config.data.max_size=-5 read images at -5. Whether the source reads a field:
    # only of the fields the overrides change, not of an older run's that it trained with
    validate_data(flag_values.config, {k for k, v in after.items() if v != before.get(k)})
    return flag_values.config
