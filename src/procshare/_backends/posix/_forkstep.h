/* What _forkstep.c shares with _forkfast.c (one extension module, two files). */
#ifndef PROCSHARE_FORKSTEP_H
#define PROCSHARE_FORKSTEP_H

#include <Python.h>
#include <sys/types.h>

#if defined(__GNUC__)
#define PS_HIDDEN __attribute__((visibility("hidden")))
#define PS_NORETURN __attribute__((noreturn))
#else
#define PS_HIDDEN
#define PS_NORETURN
#endif

/* The fork step (pipe, signals blocked, fork, die-with-parent, pidfd), with
 * the GIL held. 0 on success: in the parent *pid > 0, *fd the result pipe's
 * read end, *pidfd the pidfd or -1, and the signals STILL BLOCKED: the caller
 * records the child, then calls ps_restore_mask(); in the child *pid == 0,
 * *fd the write end, signals blocked too. -1 with a Python exception set:
 * nothing was forked (the mask is restored). */
PS_HIDDEN int ps_fork_step(int die_with_parent, int want_pidfd, int keep_write, pid_t *pid,
                           int *fd, int *pidfd);
/* With keep_write (and a pidfd), the parent may keep the pipe's write end
 * open until the read end is closed (ps_close_fd): the child's exit then
 * does not make the pipe hang up, so one poll on the pidfd and the pipe
 * wakes for data or the exit only. Whether `fd` (a read end) is such a pipe
 * of this process: */
PS_HIDDEN int ps_write_kept(int fd);
/* Restore the signal mask the last fork step saved (parent and child). */
PS_HIDDEN void ps_restore_mask(void);
/* Close a descriptor the fork step returned, so children stop closing it;
 * -1 with errno set on an error other than EBADF. */
PS_HIDDEN int ps_close_fd(int fd);
/* sys.stdout.flush() (0) or sys.stderr.flush() (1): a new reference (None
 * when there is no such stream), or NULL with the flush's error set. */
PS_HIDDEN PyObject *ps_flush_stream(int which);
/* Flush stdio, then _exit(status), or end by signal -status if negative. */
PS_HIDDEN PS_NORETURN void ps_exit(long status);
/* The number of Python threads, or -1 before threads_setup(). */
PS_HIDDEN Py_ssize_t ps_python_threads(void);
/* _forkfast.c: add its types and functions to the module. */
PS_HIDDEN int ps_fast_init(PyObject *module);

#endif
