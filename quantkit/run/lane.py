"""A second thread for the quantize half of a block, beside the next block's observation.

With --propagate float the next block's inputs are the float block's outputs, known once a block is
observed: block i can be quantized (GPTQ's column sweeps and llama.cpp's searches: thousands of small ops,
one core's work) while block i+1 is observed (the forward pass and the Hessians' x^T x: large matmuls).
The main thread keeps all but one of torch's threads, the lane gets one; on two cores each lane has a core.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LaneTask:
    """One call running in the lane: its result or exception once done, and how long it ran."""

    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    waited: float = 0.0       # how long the main thread waited for it: the rest ran beside the main thread
    done: threading.Event = field(default_factory=threading.Event)


class QuantizeLane:
    """Runs one call at a time in a daemon thread with one torch thread, in inference mode (torch's grad mode
    and thread count are per thread); the main thread gets the other threads for as long as the lane lives."""

    def __init__(self) -> None:
        self.main_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.main_threads - 1))
        self.overlapped = 0.0     # seconds both threads worked (lane time minus the main thread's waits)
        self.running: LaneTask | None = None

    @staticmethod
    def available() -> bool:
        """Whether a second lane has a core of its own (torch runs on at least two threads)."""
        return torch.get_num_threads() >= 2

    def submit(self, call: Callable[..., Any], *args) -> LaneTask:
        task = LaneTask()

        def work() -> None:
            start = time.perf_counter()
            torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    task.value = call(*args)
            except BaseException as error:     # handed to the main thread by `wait`
                task.error = error
            finally:
                task.seconds = time.perf_counter() - start
                task.done.set()

        self.running = task
        threading.Thread(target=work, name="quantkit-quantize-lane", daemon=True).start()
        return task

    def wait(self, task: LaneTask) -> Any:
        """The call's result (its exception raised here)."""
        start = time.perf_counter()
        task.done.wait()
        task.waited = time.perf_counter() - start
        self.overlapped += max(0.0, task.seconds - task.waited)
        if task.error is not None:
            raise task.error
        return task.value

    def close(self) -> None:
        """Wait for a task still running (the main thread stopped on an error or an interrupt: nothing of the run
        may go on working after it returns; its result is dropped), then give the main thread its threads back."""
        if self.running is not None:
            self.running.done.wait()
        torch.set_num_threads(self.main_threads)
