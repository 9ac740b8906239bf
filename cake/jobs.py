"""One request lifecycle for every modality: a job is queued, runs, and ends completed,
cancelled or failed. Whoever runs it sends its events (text, audio chunks) to one callback,
from its own thread; the last event says how it ended. cancel() works from any thread and
at any stage: a waiting job is dropped, a running one stops at its next step.

The text engine's Sequence is a Job run by the engine's batching scheduler (its last event
an Output with finish_reason); image and speech jobs run one at a time on a SerialWorker
(their last event a Done).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class Job:
    """What the server holds of a request in any modality. Subclasses are dataclasses that
    bring an `id`; `cancelled` is a plain flag, read between steps; `on_event` is set when
    the job is submitted (no class default: a dataclass would take it for its field's)."""

    cancelled: bool = False
    on_event: Callable[[Any], None]

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event) -> None:
        self.on_event(event)


class Cancelled(Exception):
    """Raised inside a running job to stop it (its cancel() was called)."""


@dataclass
class Done:
    """The last event of a SerialWorker's job."""

    reason: str = "completed"  # "completed", "cancelled" or "failed"
    result: Any = None
    error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return True


class SerialWorker:
    """Runs jobs one at a time, in arrival order, on one thread (a diffusers pipeline or a
    speech model keeps per-call state), so the server's event loop stays free.
    run(job) returns the job's result and may emit events on the way."""

    def __init__(self, run: Callable[[Job], Any], name: str):
        self.run, self.name = run, name
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.current: Optional[Job] = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.thread = threading.Thread(target=self._work, name=f"cake-{name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job, on_event: Callable[[Any], None]) -> Job:
        job.on_event = on_event
        self.jobs.put(job)
        return job

    def stats(self) -> dict:
        return {"queued": self.jobs.qsize(), "running": int(self.current is not None),
                **self.counts}

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled:  # its client left while it waited
                self._end(job, Done("cancelled"))
                continue
            self.current = job
            try:
                result = self.run(job)
                done = Done("cancelled") if job.cancelled else Done(result=result)
            except Cancelled:
                done = Done("cancelled")
            except Exception as e:  # reported to the client; the worker lives on
                log.exception("%s %s failed", self.name, job.id)
                done = Done("failed", error=e)
            finally:
                self.current = None
            self._end(job, done)

    def _end(self, job: Job, done: Done) -> None:
        self.counts[done.reason] += 1
        try:
            job.emit(done)
        except Exception:  # the receiver is gone (its event loop closed)
            log.warning("%s %s: its result could not be delivered", self.name, job.id,
                        exc_info=True)

    def close(self) -> None:
        """Cancel what waits and what runs, and stop the thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._end(job, Done("cancelled"))
        if self.current is not None:
            self.current.cancel()
        self.jobs.put(None)
        self.thread.join(timeout=30)
