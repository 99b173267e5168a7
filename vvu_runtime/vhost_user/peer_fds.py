"""Checks on fds a front-end hands a back-end, before the session relies on them.

* :func:`eventfd_facts`: whether an fd is an eventfd and, from
  :func:`fds.eventfd_info`, which one it is and whether it is in semaphore mode;
* :func:`check_eventfd`: an eventfd a session is given for a role (kick, call,
  err of a queue; the log), refused when it is not a plain eventfd or already
  has a role that conflicts (our own writes would become kicks, or two rings
  would steal each other's kicks);
* :func:`protect_from_shrinking`: a memory file the session maps must not be
  able to shrink under the mapping (a touch past its end is SIGBUS, fatal to
  every session of the process): memfds are sealed (by the front-end or by us).

Identity comes from ``/proc/self/fdinfo`` (``eventfd-id``, where the kernel
shows it) or, failing that, from ``kcmp(KCMP_FILE)``. Where fdinfo does not
show semaphore mode, a semaphore kick gets in, and the session's kick back-off
(``backend.KICK_BACKOFF``) is what bounds it.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
from collections.abc import Iterable

from vvu_runtime.fds import EventfdInfo, FdError, eventfd_info, is_eventfd
from vvu_runtime.vhost_user.errors import RequestError

_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
_KCMP_FILE = 0


def eventfd_facts(fd: int) -> EventfdInfo | None:
    """What fdinfo shows of ``fd`` if it is an eventfd (fields it lacks are None),
    else None."""
    if not is_eventfd(fd):
        return None
    try:
        return eventfd_info(fd)
    except FdError:
        return EventfdInfo(None, None)


def same_file(a: int, b: int) -> bool | None:
    """Whether fds ``a`` and ``b`` share one open file (kcmp); None if unknown."""
    if _SYS_KCMP is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.getpid()
    res: int = libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
    if res < 0:
        return None
    return res == 0


class Role(enum.StrEnum):
    KICK = "kick"
    CALL = "call"
    ERR = "err"
    LOG = "log"


def check_eventfd(role: Role, index: int, fd: int, what: str,
                  held: Iterable[tuple[Role, int, int]]) -> None:
    """Refuse ``fd`` as ``role`` of queue ``index`` (RequestError naming ``what``)
    unless it is a plain eventfd that no conflicting entry of ``held`` (role,
    queue, fd: what the session holds now) already is.

    A kick eventfd must be used for nothing else: shared with another ring's
    kick, two readers race for its count; shared with a call, err or log, our
    own signals become kicks (a loop at full speed). Calls and errs may share
    one eventfd between queues: we only write them.
    """
    facts = eventfd_facts(fd)
    if facts is None:
        raise RequestError(f"{what}: the fd is not an eventfd")
    if role is Role.KICK and facts.semaphore:
        raise RequestError(f"{what}: the kick eventfd is in semaphore mode (EFD_SEMAPHORE); "
                           "give a plain eventfd")
    for other_role, other_index, other_fd in held:
        if (other_role, other_index) == (role, index) or Role.KICK not in (role, other_role):
            continue  # the one being replaced, or two write-only roles
        if _same_eventfd(fd, facts, other_fd):
            raise RequestError(f"{what}: this eventfd is already the {other_role} eventfd "
                               f"of queue {other_index}; a kick eventfd cannot have a "
                               "second role")


def _same_eventfd(fd: int, facts: EventfdInfo, other: int) -> bool:
    other_facts = eventfd_facts(other)
    if other_facts is None:
        return False
    if facts.ident is not None and other_facts.ident is not None:
        return facts.ident == other_facts.ident
    return bool(same_file(fd, other))


def protect_from_shrinking(fd: int, what: str) -> str | None:
    """Make sure the memfd behind ``fd`` cannot shrink under our mapping.

    A memfd already sealed with F_SEAL_SHRINK is fine; one that allows sealing
    gets the seal from us (the front-end never needs to shrink its RAM, and
    growing stays allowed). Returns a warning naming the fix when ``fd`` is a
    memfd that cannot be sealed (made without MFD_ALLOW_SEALING); None for
    every other file, which cannot be sealed at all (a RAM file on /dev/shm or
    hugetlbfs): docs/architecture.md, "Reliability", says what that risks.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise RequestError(f"{what}: the fd is unusable: {exc}") from exc
    if not target.startswith("/memfd:"):
        return None
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & fcntl.F_SEAL_SHRINK:
            return None
        if not seals & fcntl.F_SEAL_SEAL:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            return None
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EPERM):
            raise RequestError(f"{what}: cannot read or add the memfd's seals: {exc}") from exc
    return (f"{what}: the memfd cannot be sealed against shrinking (made without "
            "MFD_ALLOW_SEALING): truncating it would crash this process; QEMU's "
            "memory-backend-memfd seals it unless seal=off")


def seal_unshrinkable(fd: int) -> None:
    """Seal a memfd we made (MFD_ALLOW_SEALING) against growing and shrinking."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)


__all__ = ["Role", "check_eventfd", "eventfd_facts", "protect_from_shrinking",
           "same_file", "seal_unshrinkable"]
