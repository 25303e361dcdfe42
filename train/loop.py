"""The training loop shared by pre-training (``train/main.py``) and fine-tuning
(``train/finetune.py``): checkpoints and resume, the non-finite policy, metrics.jsonl,
TensorBoard, loss.png, stop requests (SIGTERM / SIGINT, preemption) and ``run_steps``.

A program builds a :class:`Program` (its state, jitted step, batches and evaluation) and calls
:func:`run` inside :func:`start`'s checks and the workdir lock. With several processes every
process runs the loop; process 0 alone writes metrics, events and plots, and all of them
write their shards of each checkpoint (orbax).

The loop reads these config keys: ``num_steps``, ``log_every``, ``eval_every``,
``checkpoint_every``, ``keep_checkpoints``, ``run_steps``, ``nonfinite``, ``max_skipped``,
``log_level`` (checked here, used by the command line: ``train/console.py``) (and ``seed``,
recorded with each checkpoint). ``metrics.jsonl`` is strict JSON, one record a line: a
non-finite value (a skipped step's NaN / Inf loss) is written as ``null``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

import golore_jax as gl
from train import atomic, console, interrupts, supervise
from train import checkpoint as checkpoint_lib
from train import distributed as distributed_lib
from train.errors import (
    ConfigError,
    NonFiniteError,
    WorkdirError,
    environment_os_error,
    write_error,
)

NONFINITE_POLICIES = ("skip", "stop")
LOOP_KEYS_POSITIVE = ("num_steps", "log_every", "eval_every")
# checkpoint_every=0 divides by zero; keep_checkpoints=0 makes orbax delete every checkpoint.
LOOP_KEYS_AT_LEAST_ONE = ("checkpoint_every", "keep_checkpoints")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raises a one-line ConfigError ``config.KEY=VALUE: must be ALLOWED`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: must be {allowed}")


def validate(config: Any) -> None:
    """The loop's keys and the multi-process keys, checked before anything is built."""
    for name in LOOP_KEYS_POSITIVE:
        require(int(config[name]) > 0, name, config[name], "> 0")
    for name in LOOP_KEYS_AT_LEAST_ONE:
        require(int(config[name]) >= 1, name, config[name], ">= 1")
    require(int(config.max_skipped) >= 0, "max_skipped", config.max_skipped, ">= 0")
    if config.run_steps is not None:
        require(int(config.run_steps) >= 1, "run_steps", config.run_steps, ">= 1 (or None)")
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(
            f"config.nonfinite must be one of {NONFINITE_POLICIES}, got {config.nonfinite!r}"
        )
    console.check_level(config)
    distributed_lib.validate(config)


def start(config: Any, workdir: pathlib.Path, directories: Iterable[tuple[str, str]] = ()) -> None:
    """Joins the other processes (``config.distributed``) and checks that the workdir and the
    ``directories`` (``(path, what)`` pairs) are writable, before the first step."""
    if config.distributed:
        distributed_lib.initialize(config)
    check_directories(workdir, directories)
    _warn_small_cpu_thread_pool()


def check_directories(workdir: pathlib.Path, directories: Iterable[tuple[str, str]] = ()) -> None:
    """Every directory the run writes to must be writable, before the first step."""
    checkpoint_lib.check_writable(workdir)
    for sub in ("checkpoints", "tensorboard"):
        if (workdir / sub).exists():
            checkpoint_lib.check_writable(workdir / sub, f"workdir's {sub} directory")
    metrics = workdir / "metrics.jsonl"
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise WorkdirError(f"{metrics} is not writable")
    for path, what in directories:
        checkpoint_lib.check_writable(pathlib.Path(path), what)


def _warn_small_cpu_thread_pool() -> None:
    """Several CPU devices and no spare pool thread can hang a batched refresh (see
    train/xla_flags.py: ``python -m train`` sizes the pool; a library caller sets PJRT_NPROC)."""
    if jax.default_backend() != "cpu" or jax.local_device_count() == 1:
        return
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("PJRT_NPROC", cores))
    if threads < cores + jax.local_device_count():
        logging.warning(
            "%d CPU devices share %d XLA:CPU threads: a batched subspace refresh can hang; "
            "set PJRT_NPROC=%d (or more) before JAX starts",
            jax.local_device_count(),
            threads,
            cores + jax.local_device_count(),
        )


def to_global(batch: dict, sharding: Any) -> dict:
    """This host's rows of a batch -> a global array sharded over data x fsdp."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def process_rows(sharding: Any, global_rows: int) -> slice:
    """The rows of a ``global_rows`` batch this process's devices hold under ``sharding``."""
    index = sharding.addressable_devices_indices_map((global_rows,))
    starts = [idx[0].start or 0 for idx in index.values()]
    stops = [global_rows if idx[0].stop is None else idx[0].stop for idx in index.values()]
    return slice(min(starts), max(stops))


def global_batch(rows: dict, sharding: Any) -> dict:
    """A global batch (the same numpy rows on every process) -> a sharded array; each process
    passes only its own rows (:func:`process_rows`)."""
    out = {}
    for k, v in rows.items():
        v = np.asarray(v)
        mine = v[process_rows(sharding, len(v))]
        out[k] = jax.make_array_from_process_local_data(sharding, mine, v.shape)
    return out


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step.

    With several processes SIGTERM stays with JAX's preemption notifier, which makes all
    processes stop at the same step (:meth:`agreed`); SIGINT is forwarded to it.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        interrupts.check()  # a signal a library swallowed before the loop (train/interrupts.py)
        for sig in distributed_lib.stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if jax.process_count() > 1:
            distributed_lib.forward_to_preemption_notifier()
        else:
            self.signal = signum

    def agreed(self, step: int) -> bool:
        """Whether to save and stop after ``step``: the same answer on every process."""
        if distributed_lib.preemption_step(step):
            self.signal = signal.SIGTERM
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Program:
    """What a program gives the loop."""

    # A fresh state at step 0 (called only when there is no checkpoint to resume).
    init: Callable[[], Any]
    # The restore target: ShapeDtypeStructs with shardings.
    abstract_state: Any
    # (state, global batch) -> (state, metrics with loss, finite, leaf_finite).
    train_step: Callable[[Any, dict], tuple[Any, dict]]
    # The next global batch, on the devices.
    next_batch: Callable[[], dict]
    # The data's position (JSON), saved with each checkpoint, and how to go back to it.
    data_position: Callable[[], Any]
    set_data_position: Callable[[Any], None]
    # state -> the fields of an eval record (their names start with "eval_").
    evaluate: Callable[[Any], dict]
    # (step, metrics of the steps since the last record, seconds they took) -> the fields of a
    # train record.
    train_record: Callable[[int, list[dict], float], dict]
    param_paths: list[str]  # named in the 'stop' policy's error
    # (train record key, eval record key) plotted in loss.png.
    plot: tuple[str, str] = ("loss", "eval_loss")


@dataclasses.dataclass
class Result:
    state: Any
    step: int
    history: list[dict]  # train records
    evals: list[dict]  # eval records
    stopped_by_signal: bool
    signal: int | None = None  # the signal the run stopped on (it saved the step first)


def refresh_counts(state: Any) -> dict[str, int]:
    """``refreshes_done`` / ``refreshes_scheduled`` (matrices decomposed / leaf refreshes
    scheduled so far) of an optimizer with a lazy subspace refresh; nothing without one."""
    counts = gl.refresh_counts(getattr(state, "opt_state", None))
    if counts is None:
        return {}
    return {"refreshes_done": int(counts[0]), "refreshes_scheduled": int(counts[1])}


def _is_eval(record: dict) -> bool:
    return any(k.startswith("eval_") for k in record)


def run(config: Any, workdir: pathlib.Path, program: Program) -> Result:
    """Runs (or resumes from the newest readable checkpoint) ``program`` to
    ``config.num_steps``, or ``config.run_steps`` more steps, or a stop request."""
    interrupts.check()  # a signal swallowed during data preparation: stop before any file
    # The workdir is ours now: the command line's log file opens there (train/console.py).
    console.open_log_file(workdir, jax.process_index(), jax.process_count())
    checkpoints = checkpoint_lib.Checkpoints(
        workdir, keep=config.keep_checkpoints, every=config.checkpoint_every
    )
    # The newest readable checkpoint; unreadable newer ones are moved aside with a warning.
    restored = checkpoints.restore_latest(program.abstract_state, config)
    supervise.report(
        checkpoint=None if restored is None else restored[0], checkpoints=str(checkpoints.directory)
    )
    latest = None
    if restored is None:
        state = program.init()
        initial_eval = program.evaluate(state)
    else:
        latest, state, meta = restored
        program.set_data_position(meta["data_position"])
        logging.info("resumed from step %d in %s", latest, checkpoints.directory)
        _warn_changed_seed(meta, config, latest)

    def meta() -> dict[str, Any]:
        return {
            "data_position": program.data_position(),
            "fingerprint": checkpoint_lib.fingerprint(config),
            "config": json.loads(config.to_json_best_effort()),
        }

    metrics_path = workdir / "metrics.jsonl"
    history, evals = [], []
    main = distributed_lib.is_main()  # process 0 alone writes metrics, events and plots
    if metrics_path.exists():
        records = _read_metrics(
            metrics_path, keep_until=-1 if latest is None else latest, rewrite=main
        )
        for record in records:
            (evals if _is_eval(record) else history).append(record)
    interrupts.check()  # a signal swallowed while compiling the init / first evaluation
    writer = _summary_writer(workdir)
    step = int(state.step)
    # Stop (after saving) when this invocation has run config.run_steps steps, e.g. to fit
    # a long run into several time-limited jobs.
    stop_at = None if config.run_steps is None else step + config.run_steps
    stopped_by_signal = False
    progress = _progress(step, config.num_steps)
    metrics_cm = _MetricsFile(metrics_path) if main else contextlib.nullcontext()
    with StopRequest() as stop, metrics_cm as metrics_file:
        if latest is None:
            record = {"step": 0, **initial_eval}
            evals.append(record)
            _write(metrics_file, writer, record)
        last_time, window = time.perf_counter(), []
        while step < config.num_steps:
            state, metrics = program.train_step(state, program.next_batch())
            step += 1
            window.append(metrics)
            if config.nonfinite == "stop" and not bool(metrics["finite"]):
                bad = [
                    p
                    for p, ok in zip(program.param_paths, metrics["leaf_finite"], strict=True)
                    if not ok
                ]
                raise NonFiniteError(
                    _nonfinite_stop(step, bad, len(program.param_paths), checkpoints)
                )
            if step % config.log_every == 0 or step == config.num_steps:
                jax.block_until_ready(metrics["loss"])  # waits for the step: time it after this
                now = time.perf_counter()
                fields = program.train_record(step, window, now - last_time)
                record = {"step": step, **fields, "skipped": int(state.skipped)}
                record.update(refresh_counts(state))
                last_time, window = now, []
                history.append(record)
                _write(metrics_file, writer, record)
                progress.set_postfix(
                    {k: f"{v:.4g}" for k, v in list(fields.items())[:2] if _is_number(v)}
                )
                if record["skipped"] > config.max_skipped:
                    raise NonFiniteError(
                        f"{record['skipped']} steps had a non-finite loss or gradient, more "
                        f"than config.max_skipped={config.max_skipped}; "
                        + _resume_hint(checkpoints)
                    )
            if step % config.eval_every == 0 or step == config.num_steps:
                record = {"step": step, **program.evaluate(state)}
                evals.append(record)
                _write(metrics_file, writer, record)
            progress.update(1)
            supervise.report(step=step)
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                checkpoints.save(step, state, meta())
            if step % config.eval_every == 0 or step % config.checkpoint_every == 0:
                last_time = time.perf_counter()  # keep eval and saving out of tokens/s
            if stop.agreed(step) or step == stop_at:
                checkpoints.save(step, state, meta(), force=True)
                reason = f"received signal {stop.signal}" if stop.signal else "run_steps reached"
                print(
                    f"{reason}: saved step {step} to {checkpoints.directory}; "
                    "rerun the same command to resume"
                )
                stopped_by_signal = stop.signal is not None
                break
    interrupts.clear()  # the loop acted on a stop signal itself
    progress.close()
    checkpoints.close()
    if writer is not None:
        writer.close()
    if history and main:
        _loss_png(history, evals, workdir / "loss.png", *program.plot)
    return Result(state, step, history, evals, stopped_by_signal, stop.signal)


def _resume_hint(checkpoints: checkpoint_lib.Checkpoints) -> str:
    latest = checkpoints.latest_step()
    if latest is None:
        return (
            "no checkpoint was saved: lower config.optimizer.learning_rate (or raise "
            "config.max_skipped) and start again"
        )
    return (
        f"the newest checkpoint, step {latest} in {checkpoints.directory}, is intact: lower "
        "config.optimizer.learning_rate (or raise config.max_skipped) and rerun to resume from it"
    )


def _nonfinite_stop(
    step: int, bad: list[str], leaves: int, checkpoints: checkpoint_lib.Checkpoints
) -> str:
    """One short line: the step, where (the loss, or the leaves: the first 2 named), what to do."""
    if not bad or len(bad) == leaves:  # a non-finite loss makes every gradient non-finite
        where = f"the loss (and all {leaves} gradients)" if bad else "the loss"
    else:
        shown = ", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        where = f"the gradient of {len(bad)} of {leaves} leaves ({shown})"
    return (
        f"non-finite loss or gradient at step {step} in {where} (config.nonfinite='stop'); "
        + _resume_hint(checkpoints)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _warn_changed_seed(meta: dict[str, Any], config: Any, step: int) -> None:
    """A resumed run may change config.seed (it set the init, which is restored, and the data
    order, which continues from the saved position in the new seed's order): said loudly."""
    saved = (meta.get("config") or {}).get("seed")
    if saved is not None and saved != config.seed:
        logging.warning(
            "RESUMING step %d WITH A DIFFERENT SEED: config.seed=%s, the checkpoint was saved "
            "with seed=%s; the data order from here on follows seed %s",
            step,
            config.seed,
            saved,
            config.seed,
        )


def _read_metrics(path: pathlib.Path, keep_until: int, *, rewrite: bool = True) -> list[dict]:
    """The records of ``path`` up to step ``keep_until``: the ones after it are dropped.

    Steps run after the checkpoint a run resumes from (before a crash or kill) are run again,
    so their old records are removed (the file is rewritten atomically) and every step appears
    once. A torn last line (a kill mid-write) is dropped too.
    """
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= keep_until:
            records.append(record)
    if len(records) != len(lines) and rewrite:
        logging.warning(
            "%s: dropped %d records past the resumed step %d (they will be run again)",
            path,
            len(lines) - len(records),
            keep_until,
        )
        atomic.write_text(path, "".join(metrics_line(r) for r in records))
    return records


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def metrics_line(record: dict) -> str:
    """One line of metrics.jsonl: strict JSON, so a non-finite value (the NaN / Inf loss of a
    skipped step) is written as ``null``; the record's ``skipped`` count says why."""
    return json.dumps(_strict(record), allow_nan=False) + "\n"


# What a failed metrics / TensorBoard write leaves: everything written before it.
_WRITE_FAILED = (
    "nothing was lost: the checkpoints saved before are intact and metrics.jsonl keeps the "
    "records up to the last step; free space (or fix the permission) and rerun the same "
    "command to resume"
)


@contextlib.contextmanager
def _writing(path: pathlib.Path):
    """A write of the environment's making (disk full, read-only, quota) -> one-line
    CheckpointWriteError naming ``path``, the OS error and the free space; others raise."""
    try:
        yield
    except OSError as e:
        cause = environment_os_error(e)
        if cause is None:
            raise
        raise write_error(path, cause, _WRITE_FAILED) from e


def _write(metrics_file, writer, record: dict) -> None:
    if metrics_file is None:  # not process 0
        return
    with _writing(pathlib.Path(metrics_file.name)):
        metrics_file.write(metrics_line(record))
        metrics_file.flush()
    if writer is not None:
        with _writing(writer.path):
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    writer.add_scalar(key, value, record["step"])
            writer.flush()


class _MetricsFile:
    """metrics.jsonl, appended one record per ``os.write`` (O_APPEND, unbuffered): a record
    is on disk, or its write raised here, when :func:`_write` returns."""

    def __init__(self, path: pathlib.Path) -> None:
        self.name = str(path)
        with _writing(path):
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data) :]

    def flush(self) -> None:
        pass

    def __enter__(self) -> _MetricsFile:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)


class _Events:
    """TensorBoard scalars written in this thread (tensorboardX's SummaryWriter writes from a
    thread of its own, whose write error would end that thread and leave the queue to fill and
    block): a failed write raises here, at the record that failed."""

    def __init__(self, directory: pathlib.Path) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        directory.mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(directory / "events"))
        self.path = pathlib.Path(self._events._file_name)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        event = event_pb2.Event(summary=scalar(tag, value), wall_time=time.time(), step=step)
        self._events.write_event(event)

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def _summary_writer(workdir: pathlib.Path) -> _Events | None:
    if jax.process_index() != 0:
        return None
    with _writing(workdir / "tensorboard"):
        return _Events(workdir / "tensorboard")


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=jax.process_index() != 0, unit="step")


def _loss_png(
    history: list[dict], evals: list[dict], path: pathlib.Path, train_key: str, eval_key: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(records: list[dict], key: str) -> list[float]:
        # null in metrics.jsonl (a skipped step's non-finite loss, read back at a resume): a gap
        return [np.nan if r[key] is None else r[key] for r in records]

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [h for h in history if train_key in h]
    ax.plot([h["step"] for h in train], values(train, train_key), label="train loss")
    evals = [e for e in evals if eval_key in e]
    if evals:
        ax.plot([e["step"] for e in evals], values(evals, eval_key), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
