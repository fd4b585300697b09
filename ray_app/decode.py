"""Decoding uploads within a replica's budget: small, cheap images on the event loop, the rest in worker processes
that are killed and replaced when a decode overruns its wall time.

Usage (in a replica):
    decoder = Decoder(DecodeBudget())
    decoder.start()                                   # spawn the workers (they import only PIL and numpy)
    images = await decoder.decode([data], limits)     # 28×28 uint8 arrays; InputError or DecodeBusy
    decoder.close()

A worker is ``python -m ray_app.decode FD MEMORY_MIB``, started with ``subprocess`` (fork+exec: no copy of the Ray
worker's state, no re-import of its ``__main__``) and talking over a socket pair. It answers with raw bytes, never
a pickle, so a decoder compromised by a crafted file cannot run code in the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ray_app.preprocess import SIDE, Header, InputError, Limits, inspect, to_mnist

log = logging.getLogger(f"ray.serve.{__name__}")

MAX_WORKERS = 16
STARTUP_TIMEOUT_S = 30.0  # a fresh worker must import PIL and numpy within this
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_IMAGE_BYTES = SIDE * SIDE


@dataclass(frozen=True)
class DecodeBudget:
    """Per-replica decode budget (``user_config.decode``); every limit is decided before pixels are decoded."""

    workers: int = 2  # decode worker processes: decodes off the event loop at once; one more → 503
    timeout_s: float = 1.5  # wall time of one decode in a worker; longer → worker killed and replaced, 422
    max_mib_in_flight: int = 256  # estimated memory of all the replica's decodes at once; more → 503
    inline_max_bytes: int = 65536  # a request's uploads up to this many bytes in all …
    inline_max_pixels: int = 262144  # … and this many declared pixels (512²) decode on the event loop
    max_batch_pixels: int = 100_000_000  # declared pixels of all the images in one /predict/batch; more → 413
    retry_after_s: int = 1  # Retry-After of the 503

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"decode budget {item.name} must be a number >= 0, got {value!r}")
        if not 1 <= self.workers <= MAX_WORKERS or self.timeout_s <= 0 or self.max_mib_in_flight < 1:
            raise ValueError(
                f"decode budget needs 1 <= workers <= {MAX_WORKERS}, timeout_s > 0, max_mib_in_flight >= 1"
            )

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> DecodeBudget:
        """Validate a ``user_config.decode`` dict; unknown keys or bad values raise ``ValueError``."""
        values = dict(config or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown user_config decode keys {unknown}; known: {[f.name for f in fields(cls)]}"
            )
        return cls(**values)


class DecodeBusy(Exception):
    """The replica's decode capacity (workers or memory in flight) is in use: answer 503 with Retry-After."""


class ItemError(InputError):
    """An ``InputError`` for item ``index`` of a multi-image request."""

    def __init__(self, index: int, error: InputError) -> None:
        super().__init__(error.status_code, error.detail)
        self.index = index


class Decoder:
    """Upload bytes → 28×28 images within a ``DecodeBudget``: inline when small and cheap, else in a worker."""

    def __init__(self, budget: DecodeBudget = DecodeBudget()) -> None:
        self.budget = budget
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._bytes_in_flight = 0
        self._executor = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="decode-ipc")

    def start(self) -> None:
        """Spawn workers up to the budget (they finish starting in the background)."""
        while len(self._workers) < self.budget.workers:
            worker = _Worker(self.budget.max_mib_in_flight)
            self._workers.append(worker)
            self._idle.append(worker)

    def reconfigure(self, budget: DecodeBudget) -> None:
        """Apply a new budget; extra idle workers stop now, busy ones when their decode ends."""
        self.budget = budget
        if self._workers:
            self.start()
            while len(self._workers) > budget.workers and self._idle:
                self._retire(self._idle.pop())

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.stop()
        self._workers, self._idle = [], []
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, int]:
        """Workers alive and idle, bytes reserved by running decodes."""
        return {
            "workers": len(self._workers),
            "idle": len(self._idle),
            "bytes_in_flight": self._bytes_in_flight,
        }

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self._workers if w.pid]

    async def decode(self, items: list[bytes], limits: Limits) -> list[np.ndarray]:
        """Each upload → its 28×28 image. Errors name the item (``ItemError``) or the capacity (``DecodeBusy``).

        All headers are inspected first; then a request's small uploads decode inline until its inline budget is
        spent and the rest go to the workers, each reserving its estimated memory while it runs.
        """
        headers = []
        for index, data in enumerate(items):
            try:
                headers.append(inspect(data, limits))
            except InputError as exc:
                raise ItemError(index, exc) from None
        total = sum(h.pixels for h in headers)
        if len(items) > 1 and total > self.budget.max_batch_pixels:
            raise InputError(
                413,
                f"the images declare {total} pixels in all; the limit per request is {self.budget.max_batch_pixels}",
            )
        results: list[np.ndarray | None] = [None] * len(items)
        pixels_left, bytes_left = self.budget.inline_max_pixels, self.budget.inline_max_bytes
        offload = []
        for index, (data, header) in enumerate(zip(items, headers, strict=True)):
            if not header.python_work and header.pixels <= pixels_left and len(data) <= bytes_left:
                pixels_left, bytes_left = pixels_left - header.pixels, bytes_left - len(data)
                try:
                    results[index] = to_mnist(data, limits, header)
                except InputError as exc:
                    raise ItemError(index, exc) from None
            else:
                offload.append((index, data, header))
        if offload:
            await self._offload(offload, limits, results)
        return results  # type: ignore[return-value]  (every slot is filled or an error was raised)

    async def _offload(
        self, jobs: list[tuple[int, bytes, Header]], limits: Limits, results: list[np.ndarray | None]
    ) -> None:
        """Run ``jobs`` on as many idle workers as they need (at least one, else ``DecodeBusy``)."""
        cap = self.budget.max_mib_in_flight * 2**20
        for index, _, header in jobs:
            if header.decode_bytes > cap:
                raise ItemError(
                    index,
                    InputError(
                        413,
                        f"decoding this image needs {header.decode_bytes >> 20} MiB; the replica's "
                        f"budget is {self.budget.max_mib_in_flight} MiB",
                    ),
                )
        if not self._workers:  # not started by a replica (e.g. a test backend): start now
            self.start()
        if not self._idle:
            raise DecodeBusy(
                f"all {len(self._workers)} image decoders of this replica are busy; retry shortly"
            )
        lanes = [self._idle.pop() for _ in range(min(len(jobs), len(self._idle)))]
        queue = list(reversed(jobs))
        held = 0  # bytes this request holds
        released = asyncio.Event()  # one of this request's lanes gave its share back

        async def lane(worker: _Worker) -> None:
            nonlocal held
            try:
                while queue:
                    index, data, header = queue.pop()
                    while self._bytes_in_flight + header.decode_bytes > cap:
                        if held == 0:
                            raise DecodeBusy(
                                f"this replica is decoding {self._bytes_in_flight >> 20} MiB of images; retry shortly"
                            )
                        released.clear()
                        await released.wait()  # another lane of this request frees its share
                    self._bytes_in_flight += header.decode_bytes
                    held += header.decode_bytes
                    try:
                        results[index] = await self._run(worker, data, limits, index)
                    finally:
                        self._bytes_in_flight -= header.decode_bytes
                        held -= header.decode_bytes
                        released.set()
            finally:
                self._release(worker)

        try:
            async with asyncio.TaskGroup() as group:
                for worker in lanes:
                    group.create_task(lane(worker))
        except BaseExceptionGroup as group:  # the first lane's error ended the others
            raise group.exceptions[0] from None

    async def _run(self, worker: _Worker, data: bytes, limits: Limits, index: int) -> np.ndarray:
        """One decode in ``worker``; the worker is not given back before its thread is done with it."""
        timeout = self.budget.timeout_s
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, worker.call, data, limits, timeout
        )
        try:
            reply = await asyncio.shield(future)
        except asyncio.CancelledError:  # the client went away: the decode still ends within timeout_s
            await asyncio.wait([future])
            raise
        if reply[:1] == b"O":
            return np.frombuffer(reply, np.uint8, _IMAGE_BYTES, 1).reshape(SIDE, SIDE)
        if reply[:1] == b"E":
            raise ItemError(index, InputError(int(reply[1:4]), reply[4:].decode("utf-8", "replace")))
        if reply == b"T":
            raise ItemError(
                index,
                InputError(
                    422,
                    f"decoding the image took longer than {timeout:g} s and was stopped; "
                    "send a smaller or simpler image",
                ),
            )
        if reply == b"U":
            raise DecodeBusy("an image decoder of this replica is restarting; retry shortly")
        raise ItemError(index, InputError(422, "the image decoder failed on this image"))

    def _release(self, worker: _Worker) -> None:
        """Give a worker back, or stop it if the budget now wants fewer."""
        if worker not in self._workers:
            return
        if len(self._workers) > self.budget.workers:
            self._retire(worker)
        else:
            self._idle.append(worker)

    def _retire(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        worker.stop()


class _Worker:
    """One decode worker process and its socket; ``call`` runs in an IPC thread, one call at a time."""

    def __init__(self, memory_mib: int) -> None:
        self.memory_mib = memory_mib
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._stopped = False
        self._spawn()

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self._proc.pid if self._proc else None

    def _spawn(self) -> None:
        parent, child = socket.socketpair()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p),
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MALLOC_MMAP_THRESHOLD_": "131072",  # big buffers are mapped and unmapped: memory returns after a decode
            "MALLOC_ARENA_MAX": "1",
        }
        cmd = [sys.executable, "-m", "ray_app.decode", str(child.fileno()), str(self.memory_mib)]
        self._proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child.close()
        self._conn = Connection(parent.detach())
        self._ready = False

    def _restart(self) -> None:
        self._kill()
        self._spawn()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()

    def stop(self) -> None:
        """End the process for good (a call in progress returns b'U')."""
        self._stopped = True
        self._kill()

    def call(self, data: bytes, limits: Limits, timeout_s: float) -> bytes:
        """Decode in the worker: b'O'+pixels, b'E'+status+detail, b'T' (overran: killed and replaced),
        b'U' (no worker available), b'C' (the worker died on this image: replaced)."""
        with self._lock:
            if self._stopped:
                return b"U"
            request = pickle.dumps((data, limits, timeout_s), pickle.HIGHEST_PROTOCOL)
            for _attempt in range(2):  # a worker found dead before it got the image is replaced once
                if not self._start_if_needed():
                    return b"U"
                try:
                    self._conn.send_bytes(request)  # type: ignore[union-attr]
                    break
                except OSError as exc:
                    log.warning("decode worker %s was gone (%s); replacing it", self.pid, exc)
                    self._restart()
            else:
                return b"U"
            try:
                if not self._conn.poll(timeout_s):  # type: ignore[union-attr]
                    log.warning(
                        "decode worker %s overran %.2f s; killing and replacing it", self.pid, timeout_s
                    )
                    self._restart()
                    return b"T"
                return self._conn.recv_bytes(maxlength=1 << 16)  # type: ignore[union-attr]
            except (EOFError, OSError) as exc:
                if self._stopped:
                    return b"U"
                log.warning("decode worker %s died on an image (%s); replacing it", self.pid, exc)
                self._restart()
                return b"C"

    def _start_if_needed(self) -> bool:
        """Make sure a started, ready process is there (replacing a dead one); False if none becomes ready."""
        assert self._proc is not None and self._conn is not None
        if self._proc.poll() is not None:
            self._restart()
        if self._ready:
            return True
        try:
            ready = self._conn.poll(STARTUP_TIMEOUT_S) and self._conn.recv_bytes() == b"R"
        except (EOFError, OSError):
            ready = False
        if not ready:
            log.error("decode worker %s did not start; replacing it", self.pid)
            self._restart()
            return False
        self._ready = True
        return True


# The worker process
def _limit_memory(extra_mib: int) -> None:
    """Cap the address space at what is mapped now plus ``extra_mib`` (Linux): a runaway decode gets MemoryError."""
    try:
        with open("/proc/self/status") as status:
            mapped_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        limit = (mapped_kib << 10) + (extra_mib << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, StopIteration, ValueError):
        log.warning("decode worker: address-space limit not set")


def serve_decodes(conn: Connection) -> None:
    """Answer decode requests until the replica closes the socket."""
    conn.send_bytes(b"R")
    while True:
        try:
            data, limits, timeout_s = pickle.loads(conn.recv_bytes())  # from the replica, which started us
        except EOFError:
            return
        signal.alarm(int(timeout_s) + 5)  # the replica kills an overrunning decode; this ends an orphaned one
        try:
            reply = b"O" + np.ascontiguousarray(to_mnist(data, limits), np.uint8).tobytes()
        except InputError as exc:
            reply = b"E" + f"{exc.status_code:03d}".encode() + exc.detail.encode()
        except MemoryError:
            reply = b"E413image needs more memory to decode than a decode worker may use"
        except Exception as exc:  # a decoder bug on a crafted file: a clear 422, never a crash of the worker
            reply = b"E422cannot decode the image: " + type(exc).__name__.encode()
        finally:
            signal.alarm(0)
        conn.send_bytes(reply)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m ray_app.decode FD MEMORY_MIB``."""
    fd, memory_mib = (int(a) for a in (argv or sys.argv[1:]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the replica decides
    os.nice(10)  # the replica's event loop (health checks, small uploads) gets the CPU first
    _limit_memory(memory_mib)
    serve_decodes(Connection(fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
