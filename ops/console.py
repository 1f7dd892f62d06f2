"""What a person sees in the terminal while a job runs, and where everything else goes.

The console carries one line per stage start and finish, progress lines of long stages (done/total, pace, ETA),
and every warning and error, tracebacks in full. Routine INFO lines of Ray, MLflow and the other libraries go to
log files only: the job's own log (every record of the driver process) and Ray's session folder
(``<session>/logs``: ``ray-data/`` for Ray Data, ``train/`` for Ray Train, ``worker-*.out|err`` for every worker
and actor). Verbose mode (``--verbose``) puts everything on the console as well.

Known-harmless library messages are dropped where they are emitted: by a filter on the logger that emits them, or
by a ``warnings`` filter on their exact message and category (`KNOWN_HARMLESS`, `KNOWN_HARMLESS_WARNINGS`); every
other warning and error is shown. Ray's worker processes get the same treatment through `setup_ray_worker` (Ray's
``worker_process_setup_hook``) and, once Ray Train or Ray Data has set up the logging of a worker, `quiet_worker`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

SHOW = {"console": True}  # ``extra=`` of an INFO record that belongs on the console: stage lines, progress lines
VERBOSE_ENV = "NOMIC_EMBED_VERBOSE"  # "1": everything on the console; inherited by Ray's processes
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (logger, message text, why it is harmless): filtered at that logger in every process
KNOWN_HARMLESS = (
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state",
     "a local Ray started without a dashboard has no State API, so Ray Train's placement-group cleaner (a guard "
     "for a controller that dies; the local Ray frees its placement groups on exit anyway) repeats this each second"),
    ("ray.data._internal.progress", "Progress bars disabled",
     "the jobs turn Ray Data's progress bars off on purpose and print their own progress lines"),
)  # fmt: skip
# (thread name ending, exception, why it is harmless): uncaught exceptions of library threads, dropped by the
# thread exception hook of every process; any other thread's exception goes to the hook as before
KNOWN_HARMLESS_THREAD_ERRORS = (
    ("/completion-signaler", InterruptedError,
     "Ray Data's parallel file listing ends its completion-signaler thread by interrupting it once the listing is "
     "consumed, and that thread does not catch the InterruptedError (Ray 2.60's data/_internal/dynamic_work_queue)"),
)  # fmt: skip
# (message regex, category, why it is harmless): ``warnings`` filters in every process
KNOWN_HARMLESS_WARNINGS = (
    (r"`ExecutionOptions\.exclude_resources` is deprecated", DeprecationWarning,
     "Ray Train's own dataset manager sets the deprecated option; nothing of ours uses it"),
)  # fmt: skip


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def process_env(verbose_console: bool) -> dict[str, str]:
    """Environment of the job's processes (the driver's and, through the runtime env, Ray's): verbose or not, and
    without the tqdm bars of Hugging Face loaders ("Loading weights: 100%|...|"), which a log cannot render."""
    return {VERBOSE_ENV: "1" if verbose_console else "0",
            **({} if verbose_console else {"HF_HUB_DISABLE_PROGRESS_BARS": "1"})}  # fmt: skip


def library_level() -> str:
    """The level of the libraries' own console output (Ray Train's ``LoggingConfig``)."""
    return "INFO" if verbose() else "WARNING"


class ConsoleFilter(logging.Filter):
    """Warnings and errors, plus INFO records marked with `SHOW`; the rest stays in the log files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "console", False)


class KnownHarmless(logging.Filter):
    """Drops the records of one logger whose message contains ``text`` (a library message known to be harmless)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class ConsoleFormatter(logging.Formatter):
    """``15:12:58 message``; level and logger name in front of warnings and errors; tracebacks in full."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno >= logging.WARNING:
            return f"{stamp} {record.levelname} {record.name}: {line}"
        return f"{stamp} {line}"


def _drop_harmless_thread_errors(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread is not None else ""
    if any(name.endswith(end) and isinstance(args.exc_value, kind) for end, kind, _ in KNOWN_HARMLESS_THREAD_ERRORS):
        return
    _drop_harmless_thread_errors.previous(args)


def drop_known_harmless() -> None:
    """Install the known-harmless filters (idempotent): at their loggers, as ``warnings`` filters, and in the
    thread exception hook."""
    if threading.excepthook is not _drop_harmless_thread_errors:
        _drop_harmless_thread_errors.previous = threading.excepthook
        threading.excepthook = _drop_harmless_thread_errors
    for name, text, _ in KNOWN_HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownHarmless) and f.text == text for f in logger.filters):
            logger.addFilter(KnownHarmless(text))
    for message, category, _ in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _is_console(handler: logging.Handler, of_library: bool = False) -> bool:
    """A handler that prints to the terminal: on stdout/stderr, or any stream handler of a library's own logger
    (Ray's writes to whatever stderr is at the time, MLflow's to a wrapper of it)."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return of_library or handler.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


class Forward(logging.Handler):
    """Hands records to another handler: libraries may re-format their own handlers, not the job's log file."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def filter_consoles(file_handler: logging.Handler | None = None) -> None:
    """Every console handler of this process -- the root logger's and those of libraries that print on their own
    (Ray's, Ray Data's, MLflow's loggers have ``propagate=False``) -- shows only warnings and `SHOW` lines, or
    everything when verbose; with ``file_handler``, those libraries' loggers also write to it."""
    libraries = [lg for lg in logging.root.manager.loggerDict.values()
                 if isinstance(lg, logging.Logger) and not lg.propagate and lg.handlers]  # fmt: skip
    for logger in [logging.getLogger(), *libraries]:
        for handler in logger.handlers:
            if not _is_console(handler, of_library=logger is not logging.getLogger()):
                continue
            for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
                handler.removeFilter(old)
            if not verbose():
                handler.addFilter(ConsoleFilter())
    if file_handler is not None:
        for logger in libraries:
            if not any(isinstance(h, Forward) and h.target is file_handler for h in logger.handlers):
                logger.addHandler(Forward(file_handler))


def setup(log_file: Path | None, verbose_console: bool = False) -> list[logging.Handler]:
    """The driver's logging: a console handler on stderr, a file handler with every INFO record when ``log_file``
    is given, Python warnings into logging, known-harmless messages dropped.

    Imports Ray Data and MLflow first, so that the handlers they install on import are filtered too. Returns the
    handlers it added, for `teardown`."""
    os.environ.update(process_env(verbose_console))  # before Hugging Face's libraries read it on import
    import mlflow  # noqa: F401  (configures the "mlflow" logger on import)
    import ray.data  # noqa: F401  (configures the "ray" and "ray.data" loggers on import)

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if _is_console(h)]:  # basicConfig's, or ours from an earlier call
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter("%(message)s"))
    root.addHandler(console)
    added: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        added.append(logging.FileHandler(log_file, encoding="utf-8"))
        added[-1].setFormatter(logging.Formatter(FILE_FORMAT))
        added[-1].setLevel(logging.INFO)  # Ray Data's DEBUG lines stay in its own log
        root.addHandler(added[-1])
    logging.captureWarnings(True)
    drop_known_harmless()
    filter_consoles(added[-1] if log_file is not None else None)
    return added


def teardown(handlers: list[logging.Handler]) -> None:
    """Detach and close what `setup` added (a second job in the same process gets its own log file)."""
    for logger in [logging.getLogger(), *[lg for lg in logging.root.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger)]]:  # fmt: skip
        for handler in list(logger.handlers):
            if handler in handlers or (isinstance(handler, Forward) and handler.target in handlers):
                logger.removeHandler(handler)
    for handler in handlers:
        handler.close()
    logging.captureWarnings(False)


def setup_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for the jobs' Ray, run in every worker and actor process at its start:
    known-harmless messages dropped, Python warnings into logging, a console handler for warnings and progress
    lines (the teacher actors'), the libraries' console handlers filtered."""
    import ray

    logging.captureWarnings(True)
    drop_known_harmless()
    root = logging.getLogger()
    if not root.handlers:  # Ray Train replaces it in its workers (`quiet_worker` filters that one)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ConsoleFormatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    filter_consoles()
    # a worker's State API client looks for "the" Ray on the machine and raises when it finds several (other
    # users', tests'); point it at its own
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_worker() -> None:
    """Inside one of Ray's worker processes (a Ray Train worker, an actor running Ray Data), after Ray Train or Ray
    Data configured its logging: their console handlers show only warnings and `SHOW` lines (progress); the rest
    stays in ``<session>/logs/train/`` and ``<session>/logs/ray-data/``. A no-op in the driver, whose console is
    the job's (`setup`)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    drop_known_harmless()
    filter_consoles()


def format_duration(seconds: float) -> str:
    """``42 s``, ``3:05``, ``1:02:03``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress lines of one long piece of work: ``[evaluate] 2/5 models, 25 s each, eta 1:15, scored finetune``,
    ``[teacher] 3840 texts embedded, 52.1/s``.

    `update` prints when ``every_s`` seconds have passed since the last line, and once at the end, so a long piece
    of work shows a line at a steady pace whatever its speed; the pace is measured from the start.
    """

    def __init__(self, name: str, total: int | None, unit: str, logger: logging.Logger, every_s: float = 30.0):
        self.name, self.total, self.unit, self.log, self.every_s = name, total, unit, logger, every_s
        self.started = self.last_line = time.monotonic()
        self.finished = False

    def update(self, done: int, detail: str = "") -> None:
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if self.finished or not (finished or now - self.last_line >= self.every_s):
            return
        self.last_line, self.finished = now, finished
        rate = done / max(now - self.started, 1e-9)
        parts = [f"[{self.name}] {done}{f'/{self.total}' if self.total is not None else ''} {self.unit}"]
        if rate > 0:
            parts.append(f"{rate:.3g}/s" if rate >= 1 else f"{1 / rate:.3g} s each")
            if self.total is not None and not finished:
                parts.append(f"eta {format_duration((self.total - done) / rate)}")
        if detail:
            parts.append(detail)
        self.log.info(", ".join(parts), extra=SHOW)
