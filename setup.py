"""Build configuration that pyproject.toml cannot express on every setuptools: the C helper.

procshare's locks keep their hot path (an uncontended acquire/release of a
robust process-shared pthread mutex) in a tiny C extension, because the same
work through ctypes measured 3.3x slower than ``multiprocessing.Lock`` (see
``src/procshare/_backends/posix/_robustmutex.c``), and processes do their
fork step in one C call, which copies fewer pages after the fork (see
``src/procshare/_backends/posix/_forkstep.c``), and segments open and close
through one C call each for the same reason (``_shmstep.c``). All metadata stays in
pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "procshare._backends.posix._robustmutex",
            sources=["src/procshare/_backends/posix/_robustmutex.c"],
            depends=[
                "src/procshare/_backends/posix/_robustmutex_reuse.h",
                "src/procshare/_backends/posix/_lock_layout.h",
                "src/procshare/_slots.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            libraries=["pthread"],
        ),
        Extension(
            "procshare._backends.posix._forkstep",
            sources=[
                "src/procshare/_backends/posix/_forkstep.c",
                "src/procshare/_backends/posix/_forkfast.c",
                "src/procshare/_backends/posix/_forkjoin.c",
            ],
            depends=[
                "src/procshare/_backends/posix/_forkstep.h",
                "src/procshare/_backends/posix/_forkfast.h",
                "src/procshare/_backends/posix/_forkstep_private.h",
                "src/procshare/_slots.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
        Extension(
            "procshare._backends.posix._shmstep",
            sources=["src/procshare/_backends/posix/_shmstep.c"],
            depends=[
                "src/procshare/_backends/posix/_shmstep_types.h",
                "src/procshare/_backends/posix/_shmstep_holds.h",
                "src/procshare/_backends/posix/_shmstep_close.h",
                "src/procshare/_backends/posix/_shmstep_create.h",
                "src/procshare/_backends/posix/_lock_layout.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            libraries=["pthread"],
        ),
        Extension(
            "procshare._backends.posix._futex",
            sources=["src/procshare/_backends/posix/_futex.c"],
            depends=[
                "src/procshare/_backends/posix/_futex_ring.h",
                "src/procshare/_backends/posix/_futex_holds.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
        # The C-level `.value` of scalar views (issue 16): memory only, no OS call.
        Extension(
            "procshare._cview",
            sources=["src/procshare/_cview.c"],
            depends=[
                "src/procshare/_cview_segment.h",
                "src/procshare/_cview_close.h",
                "src/procshare/_slots.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
        # Names and OS names in C (issue 16): a fresh child naming a lock copies
        # fewer pages. Pure computation, no OS call.
        Extension(
            "procshare._engine._cengine",
            sources=["src/procshare/_engine/_cengine.c"],
            depends=[
                "src/procshare/_engine/_cengine_record.h",
                "src/procshare/_engine/_cengine_lock.h",
                "src/procshare/_engine/_cengine_end.h",
                "src/procshare/_engine/_cengine_get.h",
                "src/procshare/_engine/_cengine_new.h",
                "src/procshare/_slots.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
    ]
)
