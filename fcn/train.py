"""The training loop: data in memory or streamed, a jitted step, evaluation, checkpoints, logs.

`train_and_evaluate(config, workdir)` trains from scratch, or resumes from the
latest checkpoint in `workdir` when there is one: step, parameters, optimizer
state and data order all continue, so a stopped-and-resumed run ends with the
same parameters as one never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np

from fcn import checkpoint, head_loss, host_memory, losses, sharding, state as state_lib
from fcn.cli import less_memory, out_of_memory
from fcn.config import ConfigError, validate, validate_against_data, validate_against_source
from fcn.data import get_source, pipeline
from fcn.evaluate import evaluate_split, format_report, headline, jit_eval_steps, report
from fcn.metrics_log import MetricsLog, evaluated_at
from fcn.progress import logging_redirect, progress_bar, restart_clock, write
from fcn.traced import enable_compilation_cache

log = logging.getLogger("fcn")


def _every(step: int, period: int) -> bool:
    """Whether `step` is on the grid of `period` steps (0: never; the last step is handled apart)."""
    return bool(period) and step % period == 0


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to try."""


class _StopRequest:
    """SIGINT / SIGTERM set a flag; the loop then saves a checkpoint and exits cleanly.

    With several processes all must stop after the same step, or one would enter a collective (the
    next step, a checkpoint's barrier) that the others never join. jax.distributed's preemption
    service catches SIGTERM itself (in C++, unseen by Python) and lets the processes agree on a
    step, which `requested(step)`, asked at every step, returns True at; Ctrl-C is passed on to it as
    a SIGTERM to this process. With that service off (jax_enable_preemption_service=False), the
    processes all-gather their flags at every step instead.
    """

    def __init__(self):
        self.signum = None
        self._old = {}
        self._agree = None  # several processes: "preemption" (JAX's service) or "allgather"

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM)
        if jax.process_count() > 1:
            self._agree = "allgather"
            if jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
                self._agree, signals = "preemption", (signal.SIGINT,)  # SIGTERM stays JAX's
        for sig in signals:
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored by what started us, as a script's `&` job's
                continue  # SIGINT: it stays ignored, as Python and fcn.cli leave it, not a stop at a Ctrl-C
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self._agree == "preemption":
            signal.raise_signal(signal.SIGTERM)  # to JAX's handler: a pre-emption notice for every process

    def requested(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer in every process."""
        if self._agree is None:
            return self.signum is not None
        from jax.experimental import multihost_utils

        if self._agree == "preemption":
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(multihost_utils.process_allgather(np.int32(self.signum is not None)).any())

    def why(self) -> str:
        if self.signum is not None:
            return signal.Signals(self.signum).name + " received"
        return f"SIGTERM (or Ctrl-C) received by one of the {jax.process_count()} processes"

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_and_evaluate(config, workdir: str | os.PathLike, *, stop_after: int | None = None) -> dict:
    """Train (or resume) in `workdir`; returns the last evaluation report.

    stop_after: stop (with a checkpoint) once this call has run that many
    steps; re-running resumes. For time-sliced jobs, and for tests.
    """
    validate(config)
    fused = head_loss.fused_head_mode(config)
    if fused and jax.default_backend() != "gpu":
        log.warning(
            "config.loss.fused_head=%r on %s: where it applies, the kernel runs in Pallas's interpreter, "
            "which is slow and meant for tests; 'auto' uses it only on the GPUs it was measured on",
            config.loss.fused_head,
            jax.default_backend(),
        )
    elif fused:
        log.info(
            "the network's end (%sthe 1x1 head, the loss and its gradient) runs as one kernel where the "
            "shapes allow: config.loss.fused_head=%r (fcn/head_loss.py; 'off' turns it off)",
            "the last batch norm and ReLU, " if fused == "head+norm" else "",
            config.loss.fused_head,
        )
    jax_cache = enable_compilation_cache()
    workdir = Path(workdir)
    source = get_source(config.data)
    validate_against_source(config, source)
    abstract = state_lib.abstract_state(config, source.num_classes)  # a state too large for memory: refused here
    train_data = pipeline.training_data(source, config)  # decoded in memory, or streamed (config.data.storage)
    try:  # from here on an error stops a stream's decoding threads (the class weights start them)
        validate_against_data(config, source.num_classes, train_data.sizes_N2.tolist())
        eval_data = None  # with data.max_size: shrunk images, labels at their files' size (scored there)
        if config.data.eval_split in source.splits:
            eval_data = pipeline.eval_split(config.data, config.data.eval_split)
        if eval_data is None:
            log.warning("%s offers no %r split: training without evaluation", source.name, config.data.eval_split)
        checkpoint.check_compatible(workdir, config, source.num_classes)

        mesh = sharding.make_mesh()
        try:  # both batch sizes now, not at the first evaluation; a ConfigError, so the CLI prints one line
            sharding.check_batch_size(config.batch_size)
            if eval_data is not None:
                sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        checkpoint.prepare_workdir(workdir)  # only now: a config or data error leaves no trace
        class_weights = None
        if config.loss.class_weights in ("median_freq", "median_freq_sqrt"):
            class_weights = losses.median_frequency_weights(
                train_data.labels(), source.num_classes, source.ignore_label
            )
            if config.loss.class_weights == "median_freq_sqrt":  # milder: rare classes up, common ones not crushed
                class_weights = class_weights**0.5
            log.info("median-frequency class weights: %s", [round(float(w), 3) for w in class_weights])
        ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints, training=True)  # one run at a time
    except BaseException:
        train_data.close()
        raise
    metrics_log = None
    doing = "creating the model's state"  # (what ran out of memory, if something does)
    try:
        graphs, state, tx = state_lib.create(config, source.num_classes, keep=True, abstract=abstract)
        start = ckpts.latest_step() or 0
        if start > config.num_steps:  # before config.json is written: the workdir stays as it is
            raise ConfigError(
                f"config.num_steps={config.num_steps} is below step {start}, the latest checkpoint's in {workdir}: "
                f"nothing to train. Use --config.num_steps={start + 1} or more to train on, or a new --workdir"
            )
        saved = json.loads(config.to_json())
        # The data's folder made absolute (data.path unless a URL such as TFDS's gs://, or $FCN_CAMVID_DIR's),
        # so that python -m fcn.evaluate finds it later from any folder, in a shell without the variable
        if (path := config.data.path or source.found_at) and "://" not in path:
            saved["data"]["path"] = str(Path(path).expanduser().resolve())
        training = start < config.num_steps  # else a finished workdir, left as it is: nothing to train,
        # unless its last step has no evaluation (stopped there, then given num_steps = that step): done now
        final_eval = bool(start) and not training and eval_data is not None and not evaluated_at(workdir, start)
        if start:
            state = ckpts.restore(state, sharding=sharding.replicated(mesh))  # each process reads its shards
            log.info("resuming %s from step %d", workdir, start)
            changes = checkpoint.config_changes(workdir, saved) if training else []
            if changes:  # allowed (a learning rate, a longer run), but never unsaid
                log.warning(
                    "resuming with a config that differs from the one %s was trained with so far:\n  %s",
                    workdir,
                    "\n  ".join(changes),
                )
        # Not where nothing is trained: config.json would name settings no step was trained with.
        if jax.process_index() == 0 and training:
            checkpoint.write_json_atomic(workdir / "config.json", saved)
            info = {
                "source": source.name,
                "class_names": list(source.class_names),
                "palette": source.palette.tolist(),
                "ignore_label": source.ignore_label,
            }
            checkpoint.write_json_atomic(workdir / "dataset.json", info)
        state = jax.device_put(state, sharding.replicated(mesh))

        train_step = state_lib.jit_train_step(
            config,
            graphs,
            tx,
            source.num_classes,
            source.ignore_label,
            class_weights,
            keep_traced=True,  # a warm start skips tracing it (fcn/traced.py)
            # State and metrics stay replicated, so every process can read the losses it logs.
            out_shardings=sharding.replicated(mesh),
        )
        eval_step, logits_step = jit_eval_steps(
            graphs, source.num_classes, source.ignore_label, config.eval_hflip, mesh
        )
        metrics_log = MetricsLog(workdir, start) if training or final_eval else None  # None: nothing to log
        rows = sharding.process_slice(config.batch_size)
        last_report: dict = {}

        def evaluate(step: int) -> dict:
            # Its bar below the training bar, cleared at the end (leave=False): the line printed after says it.
            desc = f"evaluate {config.data.eval_split}"
            args = (eval_step, state, eval_data, config, source.num_classes, mesh)
            cm, _ = evaluate_split(*args, logits_step=logits_step, desc=desc, leave=False)
            return report(cm, source.class_names, split=config.data.eval_split, step=step)

        def log_eval(step: int, rep: dict) -> None:  # the line that marks `step` evaluated (evaluated_at)
            keys = ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou")
            metrics_log.write(step, {f"eval_{k}": rep[k] for k in keys}, "eval")

        if training:
            # The first call compiles: seconds on a CPU, 150-170 s on an H200 with an empty
            # cache, 6 s from it (docs/benchmarks.md): say so before a bar that does not move.
            log.info(
                "compiling the training step, or reading it from the compilation cache in %s (a first "
                "compilation on a GPU takes minutes: XLA times each convolution's algorithms)",
                jax_cache,
            )
        elif final_eval:  # config.json stays: no step is trained with this config
            if jax.process_index() == 0:
                print(
                    f"{workdir} is trained to step {start} (config.num_steps), not evaluated there: evaluating it",
                    flush=True,
                )
            doing = f"evaluating on {config.data.eval_split!r} at step {start}"
            last_report = evaluate(start)
            ckpts.save(start, state, mean_iou=last_report["mean_iou"], latest=False)  # best/ if it wins
            log_eval(start, last_report)  # then the line that marks step k evaluated: a failed save is redone
        elif jax.process_index() == 0:  # else the same command, run again, showed a bar at 100% and exited
            print(
                f"{workdir} is trained to step {start} already (config.num_steps): nothing to train. Raise "
                f"--config.num_steps to train on, or evaluate it: python -m fcn.evaluate --workdir {workdir}",
                flush=True,
            )
        doing = "in the training step"
        bar = progress_bar(  # a log file gets a line every 30 s, not every step
            total=config.num_steps,
            initial=start,
            disable=jax.process_index() != 0 or start >= config.num_steps,  # nothing to train: said above
            dynamic_ncols=True,
            unit="step",
        )
        step, t_last, n_last = start, time.time(), start
        read_at = start  # the last step whose loss was read (and finite)
        # On a CPU, one step's temporaries at a time: the next batch is made while a step runs, then
        # the loop waits for it and for its temporaries to be freed (fcn.host_memory.StepPacer).
        pacer = host_memory.StepPacer(mesh.devices.flat)
        # The bar ends its line before any error; log lines print above it, not into it.
        with _StopRequest() as stop, bar, logging_redirect(bar), host_memory.set_up_objects_frozen():
            while step < config.num_steps:
                batch = sharding.put_batch(mesh, *train_data.batch(step, config.batch_size, config.seed, rows))
                pacer.wait()
                state, out = train_step(state, *batch)
                pacer.started(out)
                step += 1
                bar.update(1)
                if step == start + 1:  # the compilation is not a step: the rate and time left from here on
                    restart_clock(bar)
                    t_last = time.time()  # and images_per_sec's (the call returns once compiled and started)
                signalled = stop.requested(step)
                stopping = signalled or (stop_after is not None and step - start >= stop_after)
                last = step == config.num_steps
                do_eval = eval_data is not None and (last or _every(step, config.eval_every))
                do_save = do_eval or last or stopping or _every(step, config.checkpoint_every)
                if do_save or _every(step, config.log_every):
                    # Fetching the loss waits for the step; done only at log and save points.
                    values = {k: float(v) for k, v in jax.device_get(out).items()}
                    _check_finite(values, step, config, ckpts, read_at=read_at)  # never checkpoint a NaN state
                    read_at = step
                    now = time.time()
                    values["images_per_sec"] = (step - n_last) * config.batch_size / max(now - t_last, 1e-9)
                    values["epoch"] = step * config.batch_size / len(train_data)
                    values["learning_rate"] = float(state_lib.learning_rate_schedule(config)(step - 1))
                    metrics_log.write(step, values)
                    bar.set_postfix(
                        epoch=f"{values['epoch']:.1f}",
                        loss=f"{values['loss']:.4f}",
                        img_s=f"{values['images_per_sec']:.1f}",
                        refresh=False,  # shown at the bar's next print: else a log file got a line per log_every
                    )
                if do_eval:
                    doing = f"evaluating on {config.data.eval_split!r} at step {step}"
                    last_report = evaluate(step)
                    log_eval(step, last_report)
                    doing = "in the training step"
                    if jax.process_index() == 0:  # write() prints even where the bar is disabled
                        write(bar, f"step {step}: {config.data.eval_split} {headline(last_report)}")
                if do_save:
                    ckpts.save(step, state, mean_iou=last_report.get("mean_iou") if do_eval else None)
                if do_save or _every(step, config.log_every):
                    t_last, n_last = time.time(), step  # throughput excludes evaluation and saving
                if stopping and not last:
                    bar.close()
                    why = stop.why() if signalled else f"stopped after {stop_after} steps"
                    if jax.process_index() == 0:
                        print(
                            f"{why}: saved a checkpoint at step {step} in {workdir}; run the same command again to "
                            "resume.",
                            flush=True,
                        )
                    break
        bar.close()
        if pacer.waits:
            log.debug("waited %d times, %.1f ms, for steps' temporaries to be freed", pacer.waits, 1e3 * pacer.waited_s)
        ckpts.wait()
    except OSError as e:
        if not e.filename or workdir.absolute() not in Path(e.filename).absolute().parents:
            raise
        # config.json, dataset.json, metrics.jsonl (a full disk, a folder made read-only): one line, not a traceback
        last = ckpts.latest_step()
        raise TrainingError(
            f"cannot write {e.filename}: {e.strerror or e}. "
            + (f"The checkpoints are untouched (the latest: step {last}); " if last else "")
            + "free space or fix permissions and re-run to resume"
        ) from e
    except jax.errors.JaxRuntimeError as e:
        if (oom := out_of_memory(e)) is None:
            raise
        last = ckpts.latest_step()
        raise TrainingError(
            f"{oom} {doing}. "
            + (f"The checkpoints are untouched (the latest: step {last}). " if last else "No checkpoint was written. ")
            + f"To use less memory try {less_memory(config, doing)}; then run the command again"
            + (
                " to resume (a new model.features or depth needs a new --workdir)"
                if last and "eval" not in doing
                else ""
            )
        ) from e
    finally:  # also on errors: orbax threads and the event file are closed, never left hanging
        train_data.close()  # a stream's decoding threads
        ckpts.close()
        if metrics_log is not None:
            metrics_log.close()
    if jax.process_index() == 0 and step == config.num_steps:
        if last_report:
            print(format_report(last_report))
        if training:  # the last line says where it all went (a finished workdir run again said so above)
            print(f"trained to step {step}: checkpoints and metrics in {workdir}", flush=True)
    return last_report


def _check_finite(values: dict, step: int, config, ckpts: checkpoint.Checkpoints, *, read_at: int) -> None:
    """Stop at a loss or gradient norm that is not finite. Both: the loss is computed before the
    step's update, so a finite loss with NaN gradients is a step whose update made the weights NaN,
    which a save at this step would have kept as the "last good checkpoint". read_at: the step at
    which they were last read, finite; between it and `step` they went unread."""
    bad = [(name, values[key]) for key, name in (("loss", "training loss"), ("grad_norm", "gradient norm"))]
    bad = [(name, v) for name, v in bad if not math.isfinite(v)]
    if not bad:
        return
    last = ckpts.latest_step()
    when = (
        f"at step {step}"
        if read_at >= step - 1
        else f"between step {read_at + 1} and step {step} (it is read at log, checkpoint and evaluation steps "
        "only: --config.log_every=1 finds the step)"
    )
    raise TrainingError(
        f"the {bad[0][0]} became {bad[0][1]} {when}. "
        + (f"The last good checkpoint (step {last}) is kept. " if last else "No checkpoint was written. ")
        + "Try "
        + ", ".join(
            [f"a lower learning rate (--config.optimizer.learning_rate={config.optimizer.learning_rate / 10:g})"]
            # only what the config does not do already
            + (["gradient clipping (--config.optimizer.grad_clip=1.0)"] if not config.optimizer.grad_clip else [])
            + (["float32 compute (--config.model.dtype=float32)"] if config.model.dtype != "float32" else [])
        )
        + "."
    )
