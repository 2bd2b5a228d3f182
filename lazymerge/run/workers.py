"""Batch workers: one task writes one output shard; executors run tasks on local
processes or on Ray, retrying those whose worker died (see lazymerge.run.batch)."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lazymerge import __version__
from lazymerge.errors import InputError, LazyMergeError, MachineError, OutputError
from lazymerge.plan.build import build_plan
from lazymerge.plan.model import MergePlan
from lazymerge.read.mapped import MappedReader
from lazymerge.recipe.spec import Recipe
from lazymerge.run.options import MergeOptions
from lazymerge.run.process import compute_threads, peak_rss, tune_process_memory
from lazymerge.run.shard import write_shard
from lazymerge.write.manifest import fingerprint, recipe_hash
from lazymerge.write.output import output_errors
from lazymerge.write.safetensors import ShardResult


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to write one shard: the recipe (output settings applied, paths
    absolute), where, and what the driver saw of the inputs, to refuse other files."""

    merge: int  # the merge's position in the batch
    shard: int  # its index in plan.shards
    name: str
    recipe: Recipe
    out: Path
    expect: dict[str, Any]  # Record.fixed's version, recipe hash and input fingerprints
    max_memory: int
    allow_nonfinite: bool
    nbytes: int  # the shard's data bytes
    device: str = "cpu"  # as --device: resolved on the worker

    @property
    def key(self) -> tuple[int, int]:
        return self.merge, self.shard


@dataclass(frozen=True)
class ShardDone:
    result: ShardResult
    nonfinite: tuple[str, ...]
    redone: bool  # an earlier attempt's .partial was there: a died task, done again
    seconds: float
    peak_rss: int  # the worker process's, bytes
    host: str


# What an executor yields per task: its result, or why it failed (see failure_text).
Outcome = ShardDone | str


class Executor(Protocol):
    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[ShardTask, Outcome]]:
        """Run every task, retrying those whose worker died; yield each once, as it ends."""
        ...


_plans: dict[str, MergePlan] = {}  # per worker process, by recipe: planning reads every header


def make_shard(task: ShardTask) -> ShardDone:
    """Write one output shard (runs on a worker)."""
    start = time.monotonic()
    host = socket.gethostname()
    plan = _worker_plan(task, host)
    if not task.out.is_dir():
        raise OutputError(
            f"on worker {host}: output {task.out} is not there; batch workers must see "
            "the driver's paths (shared storage)"
        )
    shard = plan.shards[task.shard]
    redone = (task.out / (shard.name + ".partial")).exists()
    opts = MergeOptions(
        max_memory=task.max_memory,
        progress=False,
        allow_nonfinite=task.allow_nonfinite,
        device=task.device,
    )
    with output_errors(task.out, "re-run the batch"), MappedReader() as reader:
        result, nonfinite = write_shard(shard, task.out, reader, opts, lambda n: None)
    return ShardDone(result, tuple(nonfinite), redone, time.monotonic() - start, peak_rss(), host)


def _worker_plan(task: ShardTask, host: str) -> MergePlan:
    """The task's plan, made here (and kept for the next shard of the same recipe), after
    checking that this worker sees the files the driver planned with."""
    shared = "batch workers must see the driver's paths and files (shared storage)"
    if __version__ != task.expect["lazymerge_version"]:
        raise MachineError(
            f"on worker {host}: lazymerge {__version__}, the driver runs "
            f"{task.expect['lazymerge_version']}; install the same version on every worker"
        )
    for path, expected in task.expect["inputs"].items():
        try:
            seen = fingerprint(Path(path))
        except (OSError, LazyMergeError) as e:
            raise InputError(f"on worker {host}: {path}: {one_line(e)}; {shared}") from None
        if seen != expected:
            raise InputError(
                f"on worker {host}: {path} is not the file the driver planned with (size, "
                f"mtime or header differ); {shared}"
            )
    key = json.dumps(task.recipe.to_dict(), sort_keys=True)
    plan = _plans.get(key)
    if plan is None:
        try:
            plan = build_plan(task.recipe)
        except InputError as e:
            raise InputError(f"on worker {host}: {e}; {shared}") from None
        if recipe_hash(plan) != task.expect["recipe_sha256"]:
            raise OutputError(f"on worker {host}: the recipe differs from the driver's")
        if len(_plans) >= 8:
            _plans.clear()
        _plans[key] = plan
    return plan


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    tune_process_memory()


def failure_text(e: BaseException, carried: BaseException | None = None) -> str:
    """A failure as a batch reports it: one line, naming `carried` (the worker's own
    exception) where `e` only brought it back, as Ray's RayTaskError does. With
    LAZYMERGE_DEBUG set, e's whole traceback follows the line; the worker's is part of
    it (a process pool's `_RemoteTraceback` cause, a RayTaskError's text)."""
    line = one_line(carried if carried is not None else e)
    if not os.environ.get("LAZYMERGE_DEBUG"):  # as the single-process CLI (cli.main)
        return line
    return line + "\n" + "".join(traceback.format_exception(e)).rstrip("\n")


def one_line(e: BaseException) -> str:
    """An exception as one line."""
    if isinstance(e, LazyMergeError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return f"{type(e).__name__}: {e}"  # not one we anticipated: still one line


class LocalExecutor:
    """`jobs` worker processes on this machine (spawned: no state shared with the driver).

    A worker that dies breaks the pool; the tasks it held are run again, in a new pool,
    up to `retries` times each.
    """

    def __init__(self, jobs: int, retries: int) -> None:
        self.jobs = jobs
        self.retries = retries

    def _pool(self) -> cf.ProcessPoolExecutor:
        threads = compute_threads(torch.get_num_threads(), self.jobs)
        return cf.ProcessPoolExecutor(
            self.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads,),
        )

    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[ShardTask, Outcome]]:
        flight = _Flight(collections.deque(tasks))
        pool: cf.ProcessPoolExecutor | None = None
        stillborn = 0  # pools in a row that broke before taking a task
        try:
            while flight.queue or flight.running:
                if pool is None:
                    pool, flight.broken = self._pool(), False
                flight.submit(pool, self.jobs)
                if not flight.running:  # the pool broke before taking a task
                    pool.shutdown(wait=True)
                    pool, stillborn = None, stillborn + 1
                    if stillborn > self.retries:
                        while flight.queue:
                            yield flight.queue.popleft(), "worker processes die as they start"
                    continue
                stillborn = 0
                yield from flight.collect(self.retries)
                if flight.broken and not flight.running:
                    pool.shutdown(wait=True)
                    pool = None
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Flight:
    """LocalExecutor's tasks: queued, running in the current pool, and deaths so far."""

    queue: collections.deque[ShardTask]
    running: dict[cf.Future[ShardDone], ShardTask] = field(default_factory=dict)
    deaths: collections.Counter[tuple[int, int]] = field(default_factory=collections.Counter)
    broken: bool = False  # the current pool lost a worker

    def submit(self, pool: cf.ProcessPoolExecutor, jobs: int) -> None:
        """No more in flight than workers: a pool that breaks takes only tasks that had
        started with it."""
        while self.queue and not self.broken and len(self.running) < jobs:
            try:
                self.running[pool.submit(make_shard, self.queue[0])] = self.queue[0]
                self.queue.popleft()
            except cf.process.BrokenProcessPool:  # broke since the last check
                self.broken = True

    def collect(self, retries: int) -> Iterator[tuple[ShardTask, Outcome]]:
        """Wait for a task to end; those whose worker died go back to the queue."""
        done, _ = cf.wait(self.running, return_when=cf.FIRST_COMPLETED)
        for future in done:
            task = self.running.pop(future)
            try:
                yield task, future.result()
            except cf.process.BrokenProcessPool:
                self.broken = True
                self.deaths[task.key] += 1
                if self.deaths[task.key] > retries:
                    yield task, _died(self.deaths[task.key])
                else:
                    self.queue.appendleft(task)
            except Exception as e:
                yield task, failure_text(e)


def _died(times: int) -> str:
    return f"its worker died {times} time(s) (killed, preempted or out of memory); re-run the batch"


class RayExecutor:
    """One Ray task per shard, on the cluster at `address`, else on a Ray instance started
    here with `jobs` CPUs. Ray reruns a task whose worker or node died (`retries` times);
    errors of the merge itself (bad input, NaN) are not retried."""

    def __init__(self, address: str | None, jobs: int, retries: int) -> None:
        try:
            import ray  # noqa: F401  (refused here, before any output is touched)
        except ImportError:
            raise MachineError("--executor ray needs Ray: pip install 'lazymerge[ray]'") from None
        self.address = address
        self.jobs = jobs
        self.retries = retries

    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[ShardTask, Outcome]]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        started = not ray.is_initialized()
        if started:
            try:
                ray.init(
                    address=self.address,
                    num_cpus=self.jobs if self.address is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise MachineError(f"cannot reach Ray at {self.address}: {e}") from None
        try:
            remote = ray.remote(make_shard)
            refs = {
                remote.options(
                    num_cpus=1,
                    num_gpus=int(task.device.startswith("cuda")),  # "auto": what is there
                    max_retries=self.retries,
                    retry_exceptions=False,
                ).remote(task): task
                for task in tasks
            }
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    task = refs.pop(ref)
                    try:
                        yield task, ray.get(ref)
                    except RayTaskError as e:
                        yield task, failure_text(e, e.cause)
                    except RayError:
                        yield task, _died(self.retries + 1)
        finally:
            if started:
                ray.shutdown()
