"""Images decoded and made ready for the model in worker processes, while the model runs.

At real size one photo takes 70-220 ms to decode (EXIF-upright, made RGB) and resize for SAM
(1024) and CLIP (336), about 1 s at 28 MP; done one at a time before each forward pass, that
time adds to the model's. Here ``workers`` processes do it ahead: :func:`prefetch` hands out
each input's result in input order, a bounded number of inputs ahead of the one being used.

Why a process pool (``concurrent.futures``) and not a ``torch.utils.data.DataLoader``:

- ``cores predict -`` reads JSONL from stdin, a stream of unknown length, and must not wait for
  later lines before predicting an earlier one; a DataLoader wants an indexed dataset. Here a
  feeder thread submits each input as soon as the source yields it.
- A bad input is that input's failure, not the run's: its :class:`~cores_cli.errors.CoresError`
  comes back in its place, the same one-line error the serial path raises, and the run goes on.
- ``pin_memory`` would buy nothing: the predictor stacks every image's tensors into a new
  batch tensor (``processing.transform.collate``) before it moves to the device, so a pinned
  per-image tensor is copied to pageable memory again first.

Workers are forked (where the platform allows) from the main thread once the model is loaded:
they inherit the processor without pickling it, run torch on one thread each, ignore SIGINT (the
main process decides how a run stops) and, on Linux, die with the main process, so that none
outlives it holding the output folder's lock. ``workers=0`` runs everything in this process:
the behaviour before this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import CoresError
from ..images import DEFAULT_MAX_PIXELS, LoadedImage, load_image

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_WORKERS = 8
"""The most workers chosen by default: at ~16 ms per sample on a GPU (the real-size FLOP floor)
and ~100 ms to prepare a 2-5 MP photo, about 6 keep up."""


def default_workers(on_gpu: bool, processes: int = 1) -> int:
    """Workers when ``--workers`` is not given, from the CPUs free now (:mod:`cores_cli.threads`),
    shared among the run's ``processes``. On a GPU the main process only feeds the device: every
    free CPU but one prepares images. On the CPU the model itself wants those CPUs and is far
    slower than preparing its images: one worker per 4 free CPUs, at most 2 (none on a machine
    with fewer than 4 free)."""
    from ..threads import available_cpus, default_threads

    if not on_gpu and len(available_cpus()) < 4 * processes:
        return 0  # too few CPUs for any worker, busy or not: no need to sample them (0.1 s)
    free = default_threads(processes)
    if on_gpu:
        return max(1, min(MAX_AUTO_WORKERS, free - 1))
    return min(2, free // 4)


# --------------------------------------------------------------------------- one image


@dataclass
class PreparedImage:
    """An image read as :func:`~cores_cli.images.load_image` reads it and its inputs for both
    towers (``SampleTransform.image``), with the seconds each step took where it ran."""

    image: LoadedImage
    inputs: Any
    """:class:`~cores_cli.processing.transform.ImageInputs`; its ``pixels`` are ``image.pixels``."""
    load_s: float
    preprocess_s: float

    def __reduce__(self):
        # The pixels travel as a torch tensor: torch's pickler for processes puts it in shared
        # memory (the worker pays the copy), where a numpy array would be pickled through the
        # pipe and unpickled in the main process: ~0.25 s of its time for a 28 MP photo.
        import torch

        return (_unpack, (dataclasses.replace(self.image, pixels=None), dataclasses.replace(self.inputs, pixels=None), torch.from_numpy(self.image.pixels), self.load_s, self.preprocess_s))


def _unpack(image: LoadedImage, inputs, pixels, load_s: float, preprocess_s: float) -> PreparedImage:
    image.pixels = inputs.pixels = pixels.numpy()
    return PreparedImage(image, inputs, load_s, preprocess_s)


def prepare_image(transform, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Read ``path`` and make both towers' inputs with ``transform`` (a ``SampleTransform``).
    Raises :class:`~cores_cli.errors.InputImageError` as ``load_image`` does."""
    t0 = time.perf_counter()
    image = load_image(path, max_pixels)
    t1 = time.perf_counter()
    inputs = transform.image(image.pixels)
    return PreparedImage(image, inputs, t1 - t0, time.perf_counter() - t1)


# --------------------------------------------------------------------------- the workers

_worker_state: dict[str, Any] = {}


def _start_worker(state: dict[str, Any]) -> None:
    """Run once in each worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; main decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, inherited by fork
    _die_with_parent()
    import torch

    torch.set_num_threads(1)  # one CPU per worker: --workers N uses N CPUs
    _worker_state.update(state)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that forked it ends, however it ends. A
    forked worker holds copies of the parent's descriptors, the output folder's lock among them."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent ended before prctl: nothing will signal us
            os._exit(1)


def _call(fn: Callable[..., R], item: Any) -> R:
    """In a worker: ``fn(state, item)`` with the state the pool was started with."""
    return fn(_worker_state, item)


def _ready() -> bool:
    return True


# --------------------------------------------------------------------------- the ordered prefetcher


_DONE = object()


@dataclass
class Outcome(Generic[T, R]):
    """One input and what became of it: ``value``, or the CoresError it raised."""

    item: T
    value: R | None = None
    error: CoresError | None = None
    skipped: bool = False
    """True when ``argument`` said there was nothing to do for the item (``value`` is None)."""

    def get(self) -> R | None:
        if self.error is not None:
            raise self.error
        return self.value


class WorkerDied(CoresError):
    """A worker process ended while preparing images (killed, out of memory...)."""


_DIED = "an image worker process died (out of memory, or too little shared memory in /dev/shm?); rerun with fewer --workers, or --workers 0"


def prefetch(
    items: Iterable[T],
    fn: Callable[[dict[str, Any], Any], R],
    state: dict[str, Any],
    workers: int,
    *,
    ahead: int | None = None,
    argument: Callable[[T], Any | None] = lambda item: item,
) -> Iterator[Outcome[T, R]]:
    """``fn(state, argument(item))`` for every item, in input order, each as an :class:`Outcome`.

    ``fn`` must be a module-level function (workers receive it by name). ``argument(item)``
    returning None means nothing to do for that item (an outcome with ``skipped``). A
    :class:`CoresError` raised by ``fn`` becomes that item's ``error``; anything else is a bug and
    is raised here. ``workers=0``: in this process, one item at a time, only when asked for.
    With workers, up to ``ahead`` items (default ``2 × workers``) are being prepared or wait
    beyond the one handed out. Closing the iterator (a ``break``, an exception, a signal in the
    consumer) stops the workers.
    """
    if workers <= 0:
        for item in items:
            arg = argument(item)
            if arg is None:
                yield Outcome(item, skipped=True)
                continue
            try:
                yield Outcome(item, fn(state, arg))
            except CoresError as exc:
                yield Outcome(item, error=exc)
        return
    yield from _Pool(fn, state, workers, ahead if ahead is not None else 2 * workers, argument).run(items)


class _Pool:
    def __init__(self, fn, state, workers: int, ahead: int, argument) -> None:
        self.fn, self.state, self.workers, self.argument = fn, state, workers, argument
        self.pending: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self.stop = threading.Event()

    def run(self, items: Iterable[T]) -> Iterator[Outcome[T, R]]:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker, initargs=(self.state,))
        try:
            # The first task starts every worker, here on the main thread: forking from the
            # feeder thread could copy a lock another thread holds.
            pool.submit(_ready).result()
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerDied("the image worker processes could not start; rerun with --workers 0") from None
        feeder = threading.Thread(target=self._feed, args=(pool, items), name="cores-image-feeder", daemon=True)
        feeder.start()
        try:
            while True:
                entry = self.pending.get()
                if entry is _DONE:
                    return
                if isinstance(entry, BrokenProcessPool):
                    raise WorkerDied(_DIED) from None
                if isinstance(entry, BaseException):  # the items' source failed (a read error...)
                    raise entry
                item, future = entry
                yield self._outcome(item, future)
        finally:
            self.stop.set()
            with contextlib.suppress(queue.Empty):  # a feeder blocked on a full queue moves on
                while True:
                    self.pending.get_nowait()
            # Waits for the images being prepared now (at most one per worker): a forked worker
            # holds a copy of the output folder's lock, which must be free when the run ends.
            pool.shutdown(wait=True, cancel_futures=True)

    def _feed(self, pool: ProcessPoolExecutor, items: Iterable[T]) -> None:
        """Submit each item as the source yields it; at most ``ahead`` wait to be handed out."""
        try:
            for item in items:
                if self.stop.is_set():
                    return
                arg = self.argument(item)
                future = None if arg is None else pool.submit(_call, self.fn, arg)
                self._put((item, future))
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, entry: object) -> None:
        while not self.stop.is_set():
            try:
                self.pending.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def _outcome(self, item: T, future: Future | None) -> Outcome[T, R]:
        if future is None:
            return Outcome(item, skipped=True)
        try:
            return Outcome(item, future.result())
        except CoresError as exc:
            return Outcome(item, error=exc)
        except BrokenProcessPool:
            raise WorkerDied(_DIED) from None


# --------------------------------------------------------------------------- the uses


def prepare_path(state: dict[str, Any], arg: tuple[str, int]) -> PreparedImage:
    """A worker's task (``cores predict``, ``cores eval``): one image file (path, max_pixels),
    read as ``load_image`` reads it and ready for both towers."""
    path, max_pixels = arg
    return prepare_image(state["transform"], path, max_pixels)


class PrefetchedSamples(Sequence):
    """``samples`` for :func:`~cores_cli.engine.evaluate.evaluate`, the images of those at
    ``order`` (the indices it will ask for, in that order) read and made ready for both towers
    ahead by ``workers`` with ``transform`` (the evaluating model's ``SampleTransform``).

    ``samples[j]`` for the next index of ``order`` is the record with its pixels in memory
    (``image_array``), exactly what ``sample_pixels`` would read, and :meth:`prepared_inputs`
    then gives its towers' inputs; every other access (iteration, ``len``, an index out of
    turn) and a record whose image a worker could not read give the record itself, so that the
    evaluation reads it as it always did (and reports the same error). Records whose pixels are
    already in memory are passed through. :meth:`close` stops the workers.
    """

    def __init__(self, samples: Sequence, order: Sequence[int], workers: int, ahead: int, transform, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.samples = samples
        self._left = set(order)
        self._inputs: dict[str, Any] = {}
        self._stream = prefetch(
            list(order), prepare_path, {"transform": transform}, workers, ahead=ahead,
            argument=lambda j: None if samples[j].image_array is not None else (samples[j].image_path, max_pixels),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator:
        return iter(self.samples)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.samples[j]
        sample = self.samples[j]
        prepared = self._take(j if j >= 0 else j + len(self.samples))
        if prepared is None:
            return sample
        self._inputs[sample.sample_id] = prepared.inputs
        return dataclasses.replace(sample, image_array=prepared.image.pixels)

    def prepared_inputs(self, sample) -> Any | None:
        """The towers' inputs a worker made for ``sample`` (as handed out by ``[]``), once."""
        inputs = self._inputs.pop(sample.sample_id, None)
        return inputs if inputs is not None and inputs.pixels is sample.image_array else None

    def _take(self, j: int) -> PreparedImage | None:
        if j not in self._left:
            return None
        for outcome in self._stream:  # those asked for out of turn are dropped (read in place)
            self._left.discard(outcome.item)
            if outcome.item == j:
                # in memory already (skipped), or unreadable: the record as it is
                return outcome.value
        return None

    def close(self) -> None:
        self._stream.close()
