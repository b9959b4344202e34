"""A stand-in for the `spaces` package's ZeroGPU decorator that keeps its process model, for CI (no ZeroGPU here).

What it reproduces from spaces 0.51 (`spaces/zero/wrappers.py`, `generator_function_wrapper`):

* `GPU(duration=...)` returns a decorator. A generator function becomes a generator that, in the main process,
  asks for a GPU slot (`schedule`; the duration, a number or a function of the call's arguments, is evaluated
  there), sends its arguments **pickled** to a worker process **forked** from the main process (the 'fork'
  context, as spaces), and yields what the worker yields, each value pickled back through a `SimpleQueue`.
* A worker is reused for the next call only while it is alive and idle; otherwise a new one is forked.
  `reuse=False` forks a fresh worker for every call (the platform may hand out a fresh one at any time), so
  nothing a call leaves in a worker is seen again.
* The worker runs the task in a thread of its own. Closing the generator in the main process sets the worker's
  stop event, which the worker checks after each value the task produced (it then closes the task generator).
* An exception in the task comes back as a `gr.Error` in the main process ("ZeroGPU worker error"); a worker
  that dies comes back as "GPU task aborted"; a refused schedule (quota) raises before anything is forked.
* Inside a worker, `forked` is True.

What it adds for tests: `on_worker_start` hooks run once in each new worker before its first task (spaces moves
the packed weights to the GPU there: a hook can do the same, or lift a guard that forbids forward passes in the
main process), and counters (`calls`, `forks`).
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import threading
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from multiprocessing.queues import SimpleQueue
from typing import Callable

try:  # spaces raises gradio errors; the GPU cost script runs this stand-in where gradio is not installed
    from gradio import Error as _PlatformError
except ImportError:  # pragma: no cover
    _PlatformError = RuntimeError

_CTX = multiprocessing.get_context("fork")

#: True inside a worker process.
forked = False
#: Run once in every freshly forked worker, before its first task.
on_worker_start: list[Callable[[], None]] = []


class Stats:
    calls = 0
    forks = 0


stats = Stats()


def _serve(task, arg_queue: SimpleQueue, res_queue: SimpleQueue, stop_event) -> None:
    """The worker's loop (spaces' `thread_wrapper`): one call after another, each in a thread of its own."""
    global forked
    forked = True
    for hook in on_worker_start:
        hook()
    while True:
        try:
            args, kwargs = arg_queue.get()
        except (OSError, EOFError):
            break
        stop_event.clear()

        def iterate():
            gen = task(*args, **kwargs)
            while True:
                try:
                    value = next(gen)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - reported to the main process like spaces does
                    res_queue.put(("error", type(exc).__name__, "".join(traceback.format_exception(exc))))
                    break
                if stop_event.is_set():
                    gen.close()
                    break
                res_queue.put(("ok", value, None))

        thread = threading.Thread(target=iterate)
        thread.start()
        thread.join()
        res_queue.put(("end", None, None))


class _Worker:
    def __init__(self, task):
        self.arg_queue = SimpleQueue(ctx=_CTX)
        self.res_queue = SimpleQueue(ctx=_CTX)
        self.stop_event = _CTX.Event()
        self.process = _CTX.Process(target=_serve, args=(task, self.arg_queue, self.res_queue, self.stop_event),
                                    daemon=True)
        self.process.start()
        stats.forks += 1

    def get(self):
        """The worker's next result, or None once it is gone. Its death is seen through the process sentinel, not
        by writing into the result queue: a worker killed in the middle of a `put` leaves the queue's write lock
        held, and a write from here would then wait forever."""
        reader = self.res_queue._reader  # SimpleQueue's receiving end (what `get` reads)
        while True:
            ready = wait([reader, self.process.sentinel])
            if reader in ready:
                return self.res_queue.get()
            if not reader.poll():  # gone, and everything it sent before has been read
                return None

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


_all_workers: list[_Worker] = []


def _drain_then_idle(worker: _Worker, idle: list, lock: threading.Lock) -> None:
    while (res := worker.get()) is not None:
        if res[0] == "end":
            with lock:
                idle.append(worker)
            return


def shutdown() -> None:
    """Kill every worker this stand-in forked (tests call it at teardown)."""
    while _all_workers:
        _all_workers.pop().close()


def GPU(task=None, *, duration=None, reuse: bool = True, schedule: Callable[[float], None] | None = None):
    """`spaces.GPU` as a decorator factory (`GPU(duration=...)`) or a plain decorator (`GPU(fn)`).

    `schedule(seconds)` is called in the main process before each call, like the platform's scheduler; raise
    from it to simulate a refused call (e.g. an exhausted quota)."""
    if task is None:
        return functools.partial(GPU, duration=duration, reuse=reuse, schedule=schedule)
    if not inspect.isgeneratorfunction(task):
        raise NotImplementedError("this stand-in covers generator functions, which is all the app decorates")
    idle: list[_Worker] = []
    lock = threading.Lock()

    @functools.wraps(task)
    def gradio_handler(*args, **kwargs):
        if forked:
            yield from task(*args, **kwargs)
            return
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):
            raise ValueError(f"duration must be a positive number of seconds, got {seconds!r}")
        if schedule is not None:
            schedule(seconds)
        stats.calls += 1
        with lock:
            worker = idle.pop() if idle else None
        if worker is None or not worker.process.is_alive() or not reuse:
            if worker is not None:
                worker.close()
            worker = _Worker(task)
            _all_workers.append(worker)
        worker.arg_queue.put((args, kwargs))  # pickled, as on the platform
        while True:
            res = worker.get()
            if res is None:
                raise _PlatformError("GPU task aborted")
            kind, value, detail = res
            if kind == "ok":
                try:
                    yield value
                except GeneratorExit:
                    # As spaces: tell the worker, and keep reading in the background until it is idle again.
                    worker.stop_event.set()
                    threading.Thread(target=_drain_then_idle, args=(worker, idle, lock), daemon=True).start()
                    raise
            elif kind == "error":
                print(detail)
                raise _PlatformError(f"ZeroGPU worker error: {value}")
            else:  # "end": the worker is idle again
                with lock:
                    idle.append(worker)
                return

    return gradio_handler
