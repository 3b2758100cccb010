"""Run the decoders in a child process with resource limits and a hard deadline.

FFmpeg and Pillow parse hostile bytes in C. `probe`, `sample` and `frames_at` here are
the `sample` module's functions run in a child process, and `vpdq` is `phash.vpdq_file`
run there, so a decoder that segfaults, aborts, hangs or allocates without bound kills
only that child: the caller gets the item's `SynthwatchError` and the worker goes on
with the next item.

Why a `subprocess` of `python -m synthwatch.operators.sandbox`, not `multiprocessing`:

- `fork` copies a parent that holds threads (batchers, the event loop, torch's pools)
  and their locks; a child forked while another thread holds one can deadlock.
- `spawn` and `forkserver` re-import the parent's `__main__` in every child (or preload
  it into the fork server). The parent's main imports torch more often than not, and
  torch alone maps about 3 GB of address space, which an RLIMIT_AS cap meant for the
  decoder would then have to allow. The children of a fork server are also not ours to
  `waitpid`, and the fork server and its resource tracker are process-wide singletons.
- A fresh interpreter that imports only the decoder's modules has a small, known
  address space (about 300 MB, libraries included), nothing inherited but the socket
  it talks on, and is a plain child whose exit status says which signal killed it.

Start-up is the cost: 0.27 s from spawn to first answer (median, 2 cores; most of it
importing numpy, PyAV, Pillow and pydantic), against 6 ms for a fork-server child. So
children are kept warm and reused, one per concurrent caller, for at most `_MAX_CALLS`
items each. A call then adds about 0.1 ms, plus about 0.6 ms per MB of frames: 16
frames of 1080p are 100 MB and cost 60 ms more than in-process, 2% of decoding them
from a real clip (shared/PERF_NOTES.md). A child that crashed, timed out or sent
something malformed is killed and never reused; its replacement starts at once, so the
next item does not wait for the imports.

Limits set in the child (`resource.setrlimit`):

- RLIMIT_AS: `SampleSettings.max_memory_mb` of address space; an allocation past it
  fails (MemoryError, FFmpeg's ENOMEM) and the item is `LimitExceeded`.
- RLIMIT_CPU: the item's CPU seconds, reset before each item; SIGXCPU past it.
- RLIMIT_FSIZE 0: a decoder has no business writing files (Python ignores SIGXFSZ, so
  a write fails with EFBIG). Its stdio is /dev/null, so nothing it prints can trip it.
- RLIMIT_NOFILE `_MAX_FILES`, RLIMIT_CORE 0.
- Pillow's own decompression-bomb cap is set to the item's `max_pixels`: it also
  guards the canvas a GIF frame may grow inside a seek, before any code of ours runs.

The parent owns the hard deadline (`max_decode_s` plus `_GRACE_S` for the child to
notice its own deadline and answer): the socket to the child times out at that instant
and the child is SIGKILLed.

Results travel as one msgpack header (msgspec, typed: no pickle from the child, so a
decoder subverted by its input cannot make the parent run code) followed by each
array's raw bytes, read straight into the array's buffer: one copy, bounded before it
is allocated by what the settings allow (`max_result_bytes`), and 4x faster than
pickling the same frames. Requests go the other way as pickle: the parent is the
trusted side.

What this does not do: the limits bound a decoder's resources, not its reach. Code an
exploit got running in the child still runs as our user, and could read files or open
sockets; confining that takes seccomp or namespaces, which this does not set up.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import structlog
from PIL import Image

from synthwatch import errors as errors_mod
from synthwatch.errors import CorruptMedia, LimitExceeded, SynthwatchError
from synthwatch.models.speech import SAMPLE_RATE
from synthwatch.operators import phash
from synthwatch.operators import sample as sample_op
from synthwatch.operators.sample import (
    MAX_SIDE,
    Frame,
    MediaInfo,
    Sampled,
    SampleSettings,
    register_plugins,
)
from synthwatch.schemas import MediaHash

log = structlog.get_logger("synthwatch.sandbox")

T = TypeVar("T")

_GRACE_S = 2.0
"""Past `max_decode_s`, time for the child to hit its own deadline check and answer."""
_START_TIMEOUT_S = 30.0
"""A child that has not imported its modules by then is broken, not slow."""
_MAX_CALLS = 500
"""Items per child before it is replaced: bounds what leaks or fragments in a decoder."""
_MAX_IDLE = 8
_MAX_FILES = 32
_HEADROOM_MB = 128
"""A memory cap must leave at least this much above the child's own libraries."""
_HEADER_CAP = 16 << 20
_EXIT_MEMORY = 3
"""The child's exit status when it ran out of memory even to report that."""
_ARRAY_DTYPES = frozenset({"|u1", "<f4"})
"""What decoded media comes as: uint8 pixels, float32 audio."""
_LEN = struct.Struct("<Q")


# --------------------------------------------------------------------------- public API


def prestart(memory_mb: int, count: int = 1) -> None:
    """Start up to `count` decoder children now, so their imports overlap the caller's
    own start-up (model loading) instead of delaying the first item. Never raises: a
    child that cannot start is started again on first use, which reports the error."""
    pool = _pool()
    for _ in range(max(0, min(count, _MAX_IDLE))):
        pool.replace(memory_mb)


def probe(path: Path, settings: SampleSettings) -> MediaInfo:
    """`sample.probe`, isolated (unless `settings.isolate` is off). Raises like it, and
    CorruptMedia (decoder crashed) or LimitExceeded (deadline, memory cap)."""
    if not settings.isolate:
        return sample_op.probe(path, settings)
    return run(sample_op.probe, (Path(path), settings), settings, result_type=MediaInfo)


def sample(path: Path, settings: SampleSettings, *, media_type: str | None = None) -> Sampled:
    """`sample.sample`, isolated (unless `settings.isolate` is off). Raises like it, and
    CorruptMedia (decoder crashed) or LimitExceeded (deadline, memory cap)."""
    if not settings.isolate:
        return sample_op.sample(path, settings, media_type=media_type)
    frames = settings.max_frames * MAX_SIDE * MAX_SIDE * 3
    audio = math.ceil(settings.max_audio_s * SAMPLE_RATE) * 4
    return run(
        sample_op.sample,
        (Path(path), settings),
        settings,
        kwargs={"media_type": media_type},
        result_type=Sampled,
        max_result_bytes=frames + audio,
    )


def frames_at(path: Path, times_s: list[float], settings: SampleSettings) -> list[Frame]:
    """`sample.frames_at`, isolated (unless `settings.isolate` is off). Raises like it,
    and CorruptMedia (decoder crashed) or LimitExceeded (deadline, memory cap)."""
    if not settings.isolate:
        return sample_op.frames_at(path, times_s, settings)
    return run(
        sample_op.frames_at,
        (Path(path), list(times_s), settings),
        settings,
        result_type=list[Frame],
        max_result_bytes=len(times_s) * MAX_SIDE * MAX_SIDE * 3,
    )


def vpdq(
    path: Path,
    settings: SampleSettings,
    *,
    seconds_per_hash: float = phash.VPDQ_SECONDS_PER_HASH,
    max_hashes: int = phash.VPDQ_MAX_HASHES,
) -> list[MediaHash]:
    """`phash.vpdq_file`, isolated (unless `settings.isolate` is off): the frames are
    decoded and hashed in the child, and only the hashes (about 120 bytes each, no
    arrays) come back; 600 frames of 1080p would be 3.7 GB over the socket. Raises like
    `sample`. (`pdqhash` is imported in the child on its first vPDQ, under the memory
    cap: it adds 0.2 MB and under 1 ms, so it is not preloaded into every child.)"""
    return vpdq_turned(
        path, settings, seconds_per_hash=seconds_per_hash, max_hashes=max_hashes, turns=False
    ).hashes


def vpdq_turned(
    path: Path,
    settings: SampleSettings,
    *,
    seconds_per_hash: float = phash.VPDQ_SECONDS_PER_HASH,
    max_hashes: int = phash.VPDQ_MAX_HASHES,
    turns: bool = True,
) -> phash.Vpdq:
    """`phash.vpdq_turned_file`, isolated like `vpdq`: the vPDQ and, for matching a
    mirrored or rotated copy, each frame's seven turned hashes (8x the hashes, still no
    arrays: 900 frames are under 1 MB)."""
    if not settings.isolate:
        return phash.vpdq_turned_file(
            path, settings, seconds_per_hash=seconds_per_hash, max_hashes=max_hashes, turns=turns
        )
    kwargs = {"seconds_per_hash": seconds_per_hash, "max_hashes": max_hashes, "turns": turns}
    return run(
        phash.vpdq_turned_file,
        (Path(path), settings),
        settings,
        kwargs=kwargs,
        result_type=phash.Vpdq,
        max_result_bytes=0,
    )


def run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    settings: SampleSettings,
    *,
    result_type: type[T],
    kwargs: dict[str, Any] | None = None,
    max_result_bytes: int = 0,
) -> T:
    """Call `fn(*args, **kwargs)` in a warm child under `settings`' limits.

    `fn` must be importable by name (it is pickled by reference); its result must be
    msgspec-encodable as `result_type`, numpy arrays (uint8 or float32) included, in
    all at most `max_result_bytes` of array data.

    Raises the SynthwatchError `fn` raised, same type and message; LimitExceeded when
    the child ran past the deadline, its CPU time or its memory cap; CorruptMedia when
    it crashed, died, raised any other exception (logged with its traceback) or
    answered with something malformed; RuntimeError when no child can be started at
    all (a broken installation, not a property of the media).
    """
    request = pickle.dumps(
        (fn, args, kwargs or {}, _cpu_budget(settings), settings.max_pixels),
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    pool = _pool()
    worker = pool.acquire(settings.max_memory_mb)
    if worker.send(request) is not None:
        # It died while idle or starting, before it saw this item: one fresh child.
        worker.kill()
        worker = _Worker(settings.max_memory_mb)
        why = worker.send(request)
        if why is not None:
            worker.kill()
            raise RuntimeError(f"decoder sandbox cannot start a child: {why}")
    deadline = time.monotonic() + settings.max_decode_s + _GRACE_S
    try:
        result = worker.receive(deadline, result_type, max_result_bytes)
    except SynthwatchError:
        pool.release(worker)  # the item's own error, answered normally
        raise
    except _ChildFailed as failed:
        worker.kill()
        pool.replace(settings.max_memory_mb)
        raise failed.error(settings) from None
    except BaseException:
        worker.kill()  # interrupted mid-item: its state is unknown
        raise
    pool.release(worker)
    return result


# --------------------------------------------------------------------------- parent side


class _ChildFailed(Exception):
    """The child did not answer normally: why, and what the item's error is."""

    def __init__(self, kind: str, *, exitcode: int | None = None, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.exitcode = exitcode
        self.detail = detail

    def error(self, settings: SampleSettings) -> SynthwatchError:
        code = self.exitcode
        if self.kind == "deadline":
            log.warning("decoder killed at its deadline", max_decode_s=settings.max_decode_s)
            return LimitExceeded(f"decode exceeded {settings.max_decode_s:g} s")
        if self.kind == "malformed":
            log.error("decoder sent a malformed result", detail=self.detail)
            return CorruptMedia("decoder sent a malformed result")
        if code == -signal.SIGXCPU:
            return LimitExceeded(f"decode exceeded {_cpu_budget(settings)} s of CPU time")
        if code == _EXIT_MEMORY:
            return LimitExceeded(f"decode exceeded memory cap ({settings.max_memory_mb} MB)")
        if code is not None and code < 0:
            name = _signal_name(-code)
            log.warning("decoder crashed", signal=name)
            return CorruptMedia(f"decoder crashed (signal {-code}, {name})")
        log.warning("decoder exited", exitcode=code)
        return CorruptMedia(f"decoder exited (status {code})")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def _cpu_budget(settings: SampleSettings) -> int:
    # Above the wall-clock deadline: a single-threaded child cannot use more CPU than
    # wall time, so the parent's deadline normally fires first with the clearer message;
    # this backstop still ends a child whose parent is gone.
    return math.ceil(settings.max_decode_s + _GRACE_S) + 1


class _Reply(msgspec.Struct, frozen=True):
    error: str | None = None
    """Class name of the SynthwatchError raised, "" for any other exception."""
    message: str = ""
    detail: str = ""
    value: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    sizes: list[int] = []
    """Byte length of each array that follows the header, in order."""


class _Worker:
    """One child process and the socket it answers on; used by one thread at a time."""

    def __init__(self, memory_mb: int) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "synthwatch.operators.sandbox",
                    str(child_end.fileno()),
                    str(memory_mb),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(child_end.fileno(),),
                # Out of the terminal's process group: a Ctrl-C meant for a graceful
                # shutdown must not kill in-flight decodes and fail their items.
                start_new_session=True,
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self.sock = parent_end
        self.memory_mb = memory_mb
        self.calls = 0
        self.ready = False

    def send(self, request: bytes) -> str | None:
        """Hand the child an item: None once it has it, else why it cannot take one (it
        died, or never finished starting), in which case it never saw the item."""
        if not self.ready:  # its imports and limits, before its first item
            try:
                reply = self._header(time.monotonic() + _START_TIMEOUT_S)
            except _ChildFailed as failed:
                return f"{failed.kind}, exit status {failed.exitcode}"
            if reply.error is not None:
                return reply.message
            self.ready = True
        try:
            self.sock.settimeout(None)
            self.sock.sendall(_LEN.pack(len(request)) + request)
        except OSError as exc:
            return f"gone ({exc})"
        self.calls += 1
        return None

    def receive(self, deadline: float, result_type: type[T], max_bytes: int) -> T:
        reply = self._header(deadline)
        if reply.error is not None:
            raise _reraise(reply)
        sizes = reply.sizes
        if any(n < 0 for n in sizes) or sum(sizes) > max_bytes:
            raise _ChildFailed("malformed", detail=f"{sum(sizes)} bytes over {max_bytes}")
        buffers = []
        for n in sizes:
            buf = bytearray(n)
            self._read_into(memoryview(buf), deadline)
            buffers.append(buf)
        try:
            return msgspec.msgpack.decode(
                reply.value, type=result_type, dec_hook=_ArrayDecoder(buffers)
            )
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            raise _ChildFailed("malformed", detail=str(exc)) from None

    def _header(self, deadline: float) -> _Reply:
        size = bytearray(_LEN.size)
        self._read_into(memoryview(size), deadline)
        (n,) = _LEN.unpack(size)
        if n > _HEADER_CAP:
            raise _ChildFailed("malformed", detail=f"header of {n} bytes")
        body = bytearray(n)
        self._read_into(memoryview(body), deadline)
        try:
            return msgspec.msgpack.decode(body, type=_Reply)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _ChildFailed("malformed", detail=str(exc)) from None

    def _read_into(self, view: memoryview, deadline: float) -> None:
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ChildFailed("deadline")
            self.sock.settimeout(remaining)
            try:
                got = self.sock.recv_into(view)
            except TimeoutError:
                raise _ChildFailed("deadline") from None
            except OSError:
                got = 0
            if not got:
                raise _ChildFailed("died", exitcode=self._exitcode())
            view = view[got:]

    def _exitcode(self) -> int | None:
        # The socket closes as the child dies; its exit status follows at once.
        try:
            return self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            log.error("decoder child did not exit after SIGKILL", pid=self.process.pid)

    def close(self) -> None:
        """Let an idle child exit on its own (it sees EOF), killing it if it lingers."""
        self.sock.close()
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.kill()


def _reraise(reply: _Reply) -> SynthwatchError:
    cls = getattr(errors_mod, reply.error or "", None)
    if isinstance(cls, type) and issubclass(cls, SynthwatchError):
        return cls(reply.message)
    # Anything else the decoder raised on this input: the item does not decode. Logged
    # with its traceback, because it is also a gap in sample.py's error mapping.
    log.error("decoder raised an unexpected exception", error=reply.message, detail=reply.detail)
    return CorruptMedia(f"decoder failed: {reply.message}")


class _ArrayDecoder:
    """msgspec dec_hook: rebuilds each array from its buffer, checking shape and dtype."""

    def __init__(self, buffers: list[bytearray]) -> None:
        self._buffers = buffers
        self._used: set[int] = set()

    def __call__(self, type_: type, obj: Any) -> Any:
        if type_ is not np.ndarray:
            raise TypeError(f"unexpected type {type_}")
        spec = msgspec.convert(obj, _ArraySpec)
        if spec.dtype not in _ARRAY_DTYPES or not 0 <= spec.index < len(self._buffers):
            raise ValueError("array of an unexpected type or index")
        if spec.index in self._used or any(d < 0 for d in spec.shape):
            raise ValueError("array buffer reused or negative shape")
        self._used.add(spec.index)
        dtype = np.dtype(spec.dtype)
        buf = self._buffers[spec.index]
        if math.prod(spec.shape) * dtype.itemsize != len(buf):
            raise ValueError("array shape does not match its bytes")
        return np.frombuffer(buf, dtype=dtype).reshape(spec.shape)


class _ArraySpec(msgspec.Struct, frozen=True):
    index: int
    dtype: str
    shape: list[int]


class _Pool:
    """Idle children, by memory cap (RLIMIT_AS can only be lowered in a process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._pid = os.getpid()

    def acquire(self, memory_mb: int) -> _Worker:
        with self._lock:
            if self._pid != os.getpid():  # a forked copy of us: the children are not ours
                self._idle, self._pid = [], os.getpid()
            for i, worker in enumerate(self._idle):
                if worker.memory_mb == memory_mb:
                    return self._idle.pop(i)
        return _Worker(memory_mb)

    def release(self, worker: _Worker) -> None:
        if worker.calls >= _MAX_CALLS:
            worker.close()
            self.replace(worker.memory_mb)
            return
        with self._lock:
            if len(self._idle) < _MAX_IDLE:
                self._idle.append(worker)
                return
        worker.close()

    def replace(self, memory_mb: int) -> None:
        """Start a child in place of one that was killed, so it imports while we wait."""
        with self._lock:
            if len(self._idle) >= _MAX_IDLE:
                return
        try:
            worker = _Worker(memory_mb)
        except OSError as exc:
            log.warning("could not start a spare decoder child", error=str(exc))
            return
        self.release(worker)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Pool()
            atexit.register(_POOL.close)
        return _POOL


# --------------------------------------------------------------------------- child side


def _serve(fd: int, memory_mb: int) -> None:
    """The child's loop: one request in, one reply out, until the parent hangs up."""
    sock = socket.socket(fileno=fd)
    warnings.simplefilter("ignore")  # stderr is /dev/null; formatting them costs time
    register_plugins()  # import every Pillow plugin now, not on the first item
    try:
        _limit_process(memory_mb)
    except (OSError, ValueError) as exc:
        _send_reply(sock, _Reply(error="", message=f"cannot set limits: {exc}"), [])
        return
    _send_reply(sock, _Reply(), [])
    while True:
        request = _recv_message(sock)
        if request is None:
            return
        arrays: list[np.ndarray] = []
        try:
            fn, args, kwargs, cpu_s, max_pixels = pickle.loads(request)
            _limit_cpu(cpu_s)
            # Pillow's bomb check warns past MAX_IMAGE_PIXELS and raises past twice that.
            Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)
            value = msgspec.msgpack.encode(fn(*args, **kwargs), enc_hook=_ArrayEncoder(arrays))
            reply = _Reply(value=msgspec.Raw(value), sizes=[a.nbytes for a in arrays])
        except SynthwatchError as exc:
            reply, arrays = _Reply(error=type(exc).__name__, message=str(exc)), []
        except MemoryError:
            arrays = []
            message = f"decode exceeded memory cap ({memory_mb} MB)"
            reply = _Reply(error=LimitExceeded.__name__, message=message)
        except Exception as exc:
            arrays = []
            reply = _Reply(error="", message=type(exc).__name__, detail=traceback.format_exc())
        try:
            _send_reply(sock, reply, arrays)
        except MemoryError:
            os._exit(_EXIT_MEMORY)


def _limit_process(memory_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (_MAX_FILES, _MAX_FILES))
    baseline_mb = _address_space_mb()
    if baseline_mb is not None and baseline_mb + _HEADROOM_MB > memory_mb:
        raise ValueError(
            f"max_memory_mb {memory_mb} leaves under {_HEADROOM_MB} MB above the decoder's "
            f"own {baseline_mb} MB"
        )
    cap = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _limit_cpu(seconds: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = math.ceil(usage.ru_utime + usage.ru_stime)
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _address_space_mb() -> int | None:
    """This process's address space in MB; None where /proc does not say."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) // 1024
    return None


class _ArrayEncoder:
    """msgspec enc_hook: an array becomes a reference to raw bytes sent after the header."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._arrays = arrays

    def __call__(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            # msgspec's enc_hook contract: NotImplementedError means "type unsupported",
            # which msgspec turns into its own encode error naming the type.
            raise NotImplementedError(f"cannot send {type(obj).__name__}")
        array = np.ascontiguousarray(obj)
        self._arrays.append(array)
        return {"index": len(self._arrays) - 1, "dtype": array.dtype.str, "shape": array.shape}


def _send_reply(sock: socket.socket, reply: _Reply, arrays: list[np.ndarray]) -> None:
    header = msgspec.msgpack.encode(reply)
    sock.sendall(_LEN.pack(len(header)) + header)
    for array in arrays:
        sock.sendall(array.reshape(-1).view(np.uint8).data)


def _recv_message(sock: socket.socket) -> bytes | None:
    size = _recv_exactly(sock, _LEN.size)
    if size is None:
        return None
    return _recv_exactly(sock, _LEN.unpack(size)[0])


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if not got:
            return None
        view = view[got:]
    return bytes(buf)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
