"""The one request lifecycle (cake/jobs.py) that text, image and speech requests share:
queued, running, then completed, cancelled or failed, told by the last event."""
import queue
import threading
from dataclasses import dataclass, field
from itertools import count

from cake.jobs import Cancelled, Done, Job, SerialWorker

ids = count()


@dataclass
class Work(Job):
    steps: int
    id: int = field(default_factory=lambda: next(ids))


def test_every_modality_request_is_a_job():
    from cake.audio.service import SpeechJob, SpeechRequest
    from cake.text.engine import Sequence

    assert issubclass(Sequence, Job) and issubclass(SpeechJob, Job)
    job = SpeechJob(SpeechRequest("hi"))
    assert not job.cancelled
    job.cancel()
    assert job.cancelled
    try:
        from cake.image.generator import ImageJob
    except ImportError:  # no diffusers: the image extra is not installed
        return
    assert issubclass(ImageJob, Job)


def test_serial_worker_order_cancel_failure_and_counts():
    gate, started = threading.Event(), threading.Event()
    ran = []

    def run(job: Work):
        ran.append(job.id)
        if job.steps < 0:
            raise RuntimeError("broken job")
        for step in range(job.steps):
            if job.id == first.id:
                started.set()
                gate.wait(30)
            if job.cancelled:
                raise Cancelled()
            job.emit(step)
        return f"result {job.id}"

    worker = SerialWorker(run, "test")
    events: dict = {}

    def sink(job):
        q = events[job.id] = queue.Queue()
        return q.put

    first, waiting, broken, last = Work(3), Work(1), Work(-1), Work(2)
    for job in (first, waiting, broken, last):
        worker.submit(job, sink(job))
    assert started.wait(30)
    assert worker.stats()["running"] == 1 and worker.stats()["queued"] == 3
    waiting.cancel()  # dropped before it runs
    first.cancel()  # stops at its next step
    gate.set()

    def all_events(job):
        out = []
        while not isinstance(event := events[job.id].get(timeout=30), Done):
            out.append(event)
        return out, event

    assert all_events(first)[1].reason == "cancelled"
    assert all_events(waiting) == ([], Done("cancelled"))
    got, done = all_events(broken)
    assert done.reason == "failed" and str(done.error) == "broken job"
    assert all_events(last) == ([0, 1], Done(result=f"result {last.id}"))
    assert waiting.id not in ran  # never started
    assert worker.stats() == {"queued": 0, "running": 0, "completed": 1, "cancelled": 2,
                              "failed": 1}
    worker.close()
    assert not worker.thread.is_alive()
