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
A failed task's value is ``serialize.pack_error(exc)``; a chunk's is ``(values so far,
packed error)``.

A task's ``(args, kwargs)`` travel pickled apart (``pack_arguments``), with their large
buffers out-of-band in the frame: the member's IO thread unpickles the frame, which holds
only bytes, and a task thread unpickles the arguments (``unpack_arguments``). Unpickling
arguments can import modules and run their classes' code: that is user code, and the IO
thread never runs user code.
"""

from ..net import serialize

CALL, CHUNK, CHUNK1 = 0, 1, 2  # task kinds: fn(*args, **kwargs); fn(*item) per item; fn(item) per item
OK, FAILED, CANCELLED, UNSENDABLE = 0, 1, 2, 3  # result statuses (UNSENDABLE: the value cannot be pickled)


def pack_arguments(args, kwargs) -> tuple:
    """``(pickled (args, kwargs), [out-of-band buffers])`` for a task on the wire.

    Raises:
        SerializationError: they cannot travel.
    """
    buffers: list = []
    return serialize.dumps((serialize.wrap_buffers(args), kwargs), buffers), buffers


def unpack_arguments(packed, buffers) -> tuple:
    """``(args, kwargs)`` of a task, on the thread that runs it."""
    return serialize.loads(packed, buffers)
