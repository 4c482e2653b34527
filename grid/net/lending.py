"""Reading links on a group of threads instead of the IO thread.

::

    IO thread                                 the group's idle threads, all in LinkReader.wait()
    ---------                                 --------------------------------------------------
    conn.lend_reading(): it stops reading     one epoll, shared: the kernel wakes ONE waiting
      the link (it still writes it, and         thread per readable link (EPOLLONESHOT: the
      closes it)                                link is disarmed while that thread reads)
                                              conn.read_lent(): recv, decode, check the MAC,
                                                handle the frames on this thread; re-arm
                                              a read fails -> the IO thread closes the link
    signal(): a byte in the wake pipe   ----> wakes one waiting thread (work was queued)

A frame handed from the IO thread to another thread costs two wake-ups in a row (the
thread, then the GIL the IO thread holds until it is back in its own select), about
90 µs of a round trip on this kind of machine. A thread that reads the link itself is
woken once, by the kernel, and nothing else is woken. The member's task threads read
their executor links this way (``compute/worker.py``), and so does an executor's caller
waiting for its results (``compute/completions.py``: one thread at a time has the turn);
every other link stays the IO thread's.

Lending is for links without TLS (``Connection.can_lend``): an SSL object must not be
read by one thread while another writes to it. Without ``select.epoll`` (not Linux)
nothing is lent, and ``wait()`` waits for signals only.
"""

from __future__ import annotations

import os
import select
import threading

from .connection import State

_CLOSED = State.CLOSED
_EPOLL = getattr(select, "epoll", None)
_ARMED = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLONESHOT", 0)


class LinkReader:
    """The links lent to a group of threads, and the epoll their idle threads wait in.

    ``lend(conn)`` and ``signal()`` from any thread; ``wait()`` from any number of the
    group's threads at once. After ``close()`` (once no thread waits) the links are the IO
    thread's again.
    """

    def __init__(self):
        self._epoll = _EPOLL() if _EPOLL is not None else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if self._epoll is not None:
            self._epoll.register(self._wake_r, select.EPOLLIN)  # level-triggered: one byte, one wake-up
        self._lock = threading.Lock()
        self._pipe_lock = threading.Lock()  # signal() against close(): taken with no other lock held after it
        self._links: dict[int, object] = {}  # descriptor -> lent connection
        self.stopping = False

    def lend(self, conn) -> bool:
        """Have ``conn`` read by this group from now on; False if it cannot be lent (TLS, closed, not Linux)."""
        with self._lock:
            if self._epoll is None or self.stopping or not conn.lend_reading():
                return False
            fd = conn.fileno()
            self._links[fd] = conn  # first: a thread may be woken for it the moment it is registered
            try:
                self._epoll.register(fd, _ARMED)
            except FileExistsError:  # (a number is reused only once its socket closed, which removes it)
                self._epoll.modify(fd, _ARMED)
            except OSError:
                del self._links[fd]
                conn.take_back_reading()
                return False
            return True

    def signal(self) -> None:
        """Wake one waiting thread (work was queued); a signal is kept until a thread takes it."""
        with self._pipe_lock:  # never after close(): the pipe's number may be another file's by then
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full of signals already

    def stop(self) -> None:
        """Make every ``wait()``, now and later, return at once."""
        self.stopping = True
        self.signal()  # never taken once stopping: it wakes every waiter in turn

    @property
    def lent(self) -> bool:
        """Whether any link is lent here (else nothing would wake a ``wait()`` but a signal)."""
        return bool(self._links)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until a lent link has bytes, whose frames are then handled on this thread, or a
        signal, or ``timeout`` seconds (None: no limit). Returns at once once stopping."""
        if self.stopping:
            return
        if self._epoll is None:
            select.select([self._wake_r], [], [], timeout)
            self._take_signal()
            return
        try:
            events = self._epoll.poll(-1 if timeout is None else max(timeout, 0.0), 1)  # (without the GIL)
        except (ValueError, OSError):  # closed meanwhile (stopping)
            return
        for fd, _ in events:
            if fd == self._wake_r:
                self._take_signal()
                return
            conn = self._links.get(fd)
            if conn is None:
                continue
            if conn.read_lent():
                try:
                    self._epoll.modify(fd, _ARMED)  # the next bytes wake the next waiting thread
                    continue
                except OSError:  # closed meanwhile
                    pass
            self._drop(fd, conn)

    def _take_signal(self) -> None:
        if self.stopping:
            return
        try:
            os.read(self._wake_r, 1)
        except (BlockingIOError, OSError):
            pass  # another thread took it

    def _drop(self, fd: int, conn) -> None:
        with self._lock:
            if self._links.get(fd) is conn:
                del self._links[fd]
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass  # closing the socket removed it

    def close(self) -> None:
        """Give every lent link back to the IO thread and let go of the epoll and the pipe
        (after ``stop()``, once no thread is in ``wait()``)."""
        with self._lock:
            self.stopping = True
            links, self._links = list(self._links.values()), {}
        with self._pipe_lock:
            if self._wake_w >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
        for conn in links:
            conn.take_back_reading()
        if self._epoll is not None:
            self._epoll.close()
