"""The console a job shows: stage and progress lines and every warning; the libraries' routine lines in the log file
only (everything with verbose); known-harmless messages dropped at the logger that emits them."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest

from ops import console
from ops.console import SHOW, Progress


@pytest.fixture()
def job_console(monkeypatch, tmp_path):
    """`console.setup` as the pipeline's main calls it; its environment and handlers undone afterwards."""
    for key in console.process_env(False):
        monkeypatch.setenv(key, "")
    import ray.data  # noqa: F401  (configures its logger on import)

    ray_data = logging.getLogger("ray.data")
    level = ray_data.level
    ray_data.setLevel(logging.DEBUG)  # Ray Data's own default (the test session's environment sets WARNING)
    handlers: list[logging.Handler] = []

    def setup(verbose: bool):
        console.teardown(handlers)
        handlers[:] = console.setup(tmp_path / "logs" / "job.log", verbose_console=verbose)
        return tmp_path / "logs" / "job.log"

    yield setup
    console.teardown(handlers)
    ray_data.setLevel(level)


def emit_a_job() -> None:
    logging.getLogger("workflows.pipeline").info("[pipeline] mlm: started (stage 2 of 8)", extra=SHOW)
    logging.getLogger("ray.data._internal.execution.streaming_executor").info("Dataset ds_1 execution finished")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("workflows.train").info("optimizer: 13 tensors with weight decay, 12 without")
    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    cleaner.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
    cleaner.warning("Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group")
    logging.getLogger("ops").warning("3 rows quarantined as too_long")
    warnings.warn("`ExecutionOptions.exclude_resources` is deprecated and will be removed", DeprecationWarning,
                  stacklevel=1)  # fmt: skip
    warnings.warn("a library's own warning", UserWarning, stacklevel=1)
    try:
        raise ValueError("the reason, in full")
    except ValueError as err:
        logging.getLogger("workflows.pipeline").error("[pipeline] mlm: failed after 3 s", exc_info=err)


ROUTINE = ("Dataset ds_1 execution finished", "Creating initial MLflow database tables", "optimizer: 13 tensors")
SHOWN = ("[pipeline] mlm: started", "3 rows quarantined", "a library's own warning",
         "[pipeline] mlm: failed after 3 s", "Traceback (most recent call last)", "ValueError: the reason, in full")
# Ray's own handler prints this one (to the stderr it found at import, which pytest's capture does not see); the
# log file shows that the logger filter dropped only the harmless message, not the logger's other warnings
RAY_WARNING = "controller actor (abc) is dead"
HARMLESS = ("Failed to query Ray Train Controller", "exclude_resources")


def test_console_shows_stages_warnings_and_errors_and_the_log_file_keeps_the_rest(job_console, capfd):
    log_file = job_console(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        console.drop_known_harmless()
        emit_a_job()
    shown = capfd.readouterr().err
    for text in SHOWN:
        assert text in shown, text
    for text in ROUTINE + HARMLESS:
        assert text not in shown, text
    kept = log_file.read_text()
    for text in SHOWN + ROUTINE + (RAY_WARNING,):
        assert text in kept, text
    for text in HARMLESS:  # dropped at their logger / by their warnings filter, so not in the file either
        assert text not in kept, text


def test_verbose_shows_the_routine_lines_too(job_console, capfd):
    ray_data_console = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    job_console(verbose=False)
    assert all(any(isinstance(f, console.ConsoleFilter) for f in h.filters) for h in ray_data_console)
    job_console(verbose=True)  # switching back on removes the filters the quiet set-up put on library handlers
    assert ray_data_console
    assert not any(isinstance(f, console.ConsoleFilter) for h in ray_data_console for f in h.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        console.drop_known_harmless()
        emit_a_job()
    shown = capfd.readouterr().err
    for text in SHOWN + ROUTINE[1:]:  # Ray Data's line goes through Ray's handler (see RAY_WARNING)
        assert text in shown, text
    for text in HARMLESS:
        assert text not in shown, text


def test_a_known_harmless_thread_error_is_dropped_and_any_other_is_passed_on(monkeypatch):
    def fail(error: Exception) -> None:
        raise error

    passed_on = []  # what reaches the thread exception hook that was there before (Python's prints it)
    monkeypatch.setattr(threading, "excepthook", lambda args: passed_on.append((args.thread.name, args.exc_value)))
    console.drop_known_harmless()
    for name, error in (("pool-1/completion-signaler", InterruptedError()), ("pool-1/worker-0", ValueError("real"))):
        thread = threading.Thread(target=fail, args=(error,), name=name)
        thread.start()
        thread.join()
    assert [(name, str(error)) for name, error in passed_on] == [("pool-1/worker-0", "real")]


def test_every_known_harmless_message_says_why():
    for logger, text, why in console.KNOWN_HARMLESS:
        assert logger.startswith("ray.") and text and len(why) > 40
    for message, category, why in console.KNOWN_HARMLESS_WARNINGS:
        assert issubclass(category, Warning) and message and len(why) > 40
    for name, error, why in console.KNOWN_HARMLESS_THREAD_ERRORS:
        assert issubclass(error, Exception) and name and len(why) > 40


def test_progress_lines_come_at_a_steady_pace_and_once_at_the_end(caplog, monkeypatch):
    clock = iter([0.0, 5.0, 40.0, 50.0, 60.0, 61.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO)
    progress = Progress("evaluate", 4, "models", logging.getLogger("test.progress"), every_s=30)
    progress.update(1, "scored a")  # 5 s: too soon
    progress.update(2, "scored b")  # 40 s: a line
    progress.update(3, "scored c")  # 50 s: too soon after the last
    progress.update(4, "scored d")  # 60 s: the end, always
    progress.update(4, "scored d")  # once
    lines = [r.getMessage() for r in caplog.records if r.name == "test.progress"]
    assert lines == ["[evaluate] 2/4 models, 20 s each, eta 40 s, scored b",
                     "[evaluate] 4/4 models, 15 s each, scored d"]
    assert all(getattr(r, "console", False) for r in caplog.records if r.name == "test.progress")


def test_durations_read_like_a_clock():
    assert [console.format_duration(s) for s in (4.4, 65, 3723)] == ["4 s", "1:05", "1:02:03"]
