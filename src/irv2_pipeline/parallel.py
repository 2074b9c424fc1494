"""Mapping a function over jobs on worker processes, for CPU-bound nodes."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from typing import Any

# Chunks queued per worker: enough to keep every worker busy between two results.
IN_FLIGHT_PER_WORKER = 4


def worker_count(workers: int | str, parameter: str = "workers") -> int:
    """The number of processes a ``workers`` parameter asks for.

    ``auto`` is the number of cores this process may run on (its CPU affinity, as
    ``taskset`` or a container's cpuset limits it), not every core of the machine.

    Args:
        workers: ``auto`` or a positive integer.
        parameter: The parameter's full name, for the error message.

    Raises:
        ValueError: Neither ``auto`` nor a positive integer.
    """
    if workers == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    try:
        count = int(workers)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ValueError(f"{parameter} = {workers!r}: use 'auto' or a positive integer")
    return count


def process_map(
    function: Callable[[Any], Any],
    jobs: Iterable[Any],
    workers: int | str,
    *,
    parameter: str = "workers",
    chunksize: int = 32,
    initializer: Callable[[], None] | None = None,
) -> Iterator[Any]:
    """Maps ``function`` over ``jobs`` in order, on ``workers`` processes.

    With one worker the jobs run in this process, without ``initializer``. Workers
    are started with ``spawn``, not ``fork``: the parent may hold TensorFlow's
    threads, which a forked child would inherit in an undefined state.

    Args:
        function: A module-level (picklable) function of one job.
        jobs: The jobs, picklable.
        workers: ``auto`` (one per core) or a number of processes.
        parameter: The name of the ``workers`` parameter, for error messages.
        chunksize: Jobs sent to a worker at a time.
        initializer: Runs once in every worker process before its first job.

    Yields:
        ``function(job)`` for every job, in the order of ``jobs``.
    """
    count = worker_count(workers, parameter)
    if count <= 1:
        yield from map(function, jobs)
        return
    job_iterator = iter(jobs)
    chunks = iter(lambda: list(islice(job_iterator, chunksize)), [])
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=count, mp_context=context, initializer=initializer
    ) as pool:
        # A few chunks per worker in flight, not every job submitted at once (as
        # Executor.map does): memory stays flat however many jobs there are.
        in_flight: deque[Future] = deque(
            pool.submit(_apply, function, chunk)
            for chunk in islice(chunks, IN_FLIGHT_PER_WORKER * count)
        )
        try:
            while in_flight:
                results = in_flight.popleft().result()
                chunk = next(chunks, None)
                if chunk is not None:
                    in_flight.append(pool.submit(_apply, function, chunk))
                yield from results
        except BaseException:
            # A failed job (or a caller that stops early) ends the run now, instead
            # of after every queued job has run for nothing.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _apply(function: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    """Runs ``function`` on each job of one chunk (in a worker process)."""
    return [function(job) for job in chunk]
