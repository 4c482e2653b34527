"""The task protocol: what an executor and a member's TaskRunner say to each other.

Both sides import it; neither imports the other. Messages (``messaging`` typed frames):

    executor -> member   "tasks"    (forget, functions, tasks)
                                    forget:    [function id]    ids the executor's cache dropped
                                    functions: [(function id, pickled function)]  new on this link
                                    tasks:     [(task id, function id, kind, arguments, buffers)]
                         "cancel"   [task id]   not started yet: do not start them
                         "init"     pickled (initializer, initargs), run before this link's tasks
                         "services" request: which services this member offers
    member -> executor   "results"  [(task id, status, value, seconds)]

A task's ``kind`` says how its function is called; a result's ``status`` what came of it.
A call's value is ``pack_value(result)``, a chunk's ``pack_value(values)``; a failed
task's is ``serialize.pack_error(exc)``, a failed chunk's ``(pack_value(values so far),
packed error)``; an UNSENDABLE one's is the packed error saying why.

A task's ``(args, kwargs)`` travel pickled apart (``pack_arguments``), with their large
buffers out-of-band in the frame: the member's IO thread unpickles the frame, which holds
only bytes, and a task thread unpickles the arguments (``unpack_arguments``). Unpickling
arguments can import modules and run their classes' code: that is user code, and the IO
thread never runs user code.

Results travel the same way, each pickled apart (``pack_value``): the executor's IO thread
only queues them, and each is unpickled where its Future is completed. So a result the
caller cannot unpickle fails its own task, saying why, and nothing else.
"""

from ..net import serialize

# Frames are cut near this size, both ways: a sender batches small tasks or results into one
# frame, but not large ones. Frames of about one size let the receiver reuse its buffers (fresh
# memory costs more than the copy into it), and the first bytes are handled while later ones travel.
FRAME_BYTES = 1024 * 1024

CALL, CHUNK, CHUNK1 = 0, 1, 2  # task kinds: fn(*args, **kwargs); fn(*item) per item; fn(item) per item
OK, FAILED, CANCELLED, UNSENDABLE = 0, 1, 2, 3  # result statuses (UNSENDABLE: the value cannot be pickled)


def pack_arguments(args, kwargs) -> tuple:
    """``(pickled (args, kwargs), [out-of-band buffers])`` for a task on the wire.

    Raises:
        SerializationError: they cannot travel.
    """
    buffers: list = []
    return serialize.dumps((serialize.wrap_buffers(args), kwargs), buffers), buffers


def packed_size(pickled, buffers) -> int:
    """The bytes that ``(pickled, buffers)`` take in a frame."""
    size = len(pickled)
    for buffer in buffers:
        size += memoryview(buffer).nbytes
    return size


def unpack_arguments(packed, buffers) -> tuple:
    """``(args, kwargs)`` of a task, on the thread that runs it."""
    return serialize.loads(packed, buffers)


def pack_value(value) -> tuple:
    """``(pickled value, [out-of-band buffers])`` for a result on the wire; large buffers in it
    (marked by ``serialize.wrap_buffers``) travel out-of-band.

    Raises:
        SerializationError: it cannot travel.
    """
    buffers: list = []
    return serialize.dumps(value, buffers), buffers


def unpack_value(packed):
    """A result from ``pack_value``'s pair, where its Future is completed."""
    pickled, buffers = packed
    return serialize.loads(pickled, buffers)


NO_VALUES = pack_value([])  # a chunk that failed before any of its items ran
