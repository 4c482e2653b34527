"""The task protocol: what an executor and a member's TaskRunner say to each other.

Both sides import it; neither imports the other. Messages (``messaging`` typed frames):

    executor -> member   "tasks"    (forget, functions, tasks)
                                    forget:    [function id]    ids the executor's cache dropped
                                    functions: [(function id, pickled function)]  new on this link
                                    tasks:     [(task id, function id, kind, args, kwargs)]
                         "cancel"   [task id]   not started yet: do not start them
                         "init"     pickled (initializer, initargs), run before this link's tasks
                         "services" request: which services this member offers
    member -> executor   "results"  [(task id, status, value, seconds)]

A task's ``kind`` says how its function is called; a result's ``status`` what came of it.
A failed task's value is ``serialize.pack_error(exc)``; a chunk's is ``(values so far,
packed error)``.
"""

CALL, CHUNK, CHUNK1 = 0, 1, 2  # task kinds: fn(*args, **kwargs); fn(*item) per item; fn(item) per item
OK, FAILED, CANCELLED, UNSENDABLE = 0, 1, 2, 3  # result statuses (UNSENDABLE: the value cannot be pickled)
