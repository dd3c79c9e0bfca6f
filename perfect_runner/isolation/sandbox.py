"""The sandbox: the fork server's init owns a PID and mount namespace of its own.

Runs in the fork server process (see `forkserver`), never in the control process.

- `Probe` runs the whole sequence once in a throwaway child and answers
  which mode the server runs in: "namespace", or "off" with the reason.
- `enter_namespace` unshares a new PID and mount namespace (and, without
  root, a user namespace mapping only our own uid and gid). The next process
  forked is the namespace's init (PID 1).
- `become_init` is that init's setup: die with the stub that forked it, make
  every mount private, mount a fresh /proc that shows only the namespace,
  shrink the capability bounding set and set no_new_privs.
- `drop_capabilities` is one precomputed `capset()` in every flow and task
  process: Docker's default set for root, nothing for anyone else.

What the kernel then guarantees: when init dies, every process in the
namespace dies with it; nothing inside can see or signal the worker's
processes; init ignores every signal sent from inside that it has no handler for.

Python 3.11 has neither `os.unshare` nor `os.mount`: ctypes, looked up once.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

from .oskit import PR_SET_PDEATHSIG, prctl

MODES = ("auto", "namespace", "off")
FAIL_ENV = "PERFECT_TEST_SANDBOX_FAIL"  # test only: make the probe fail at this step

INSIDE = False  # set in init: every process forked below it drops its capabilities

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_VERSION_3 = 0x20080522

# Docker's default capability set: what a root task keeps.
DOCKER_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)
# CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW
# SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP

_libc = ctypes.CDLL(None, use_errno=True)
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_void_p]
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_capset = _libc.capset
_capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
# Every task process calls capset once: without argtypes or an errno copy it touches
# ~20 fewer pages (copy-on-write faults); a failure is repeated above for its errno.
_capset_fast = ctypes.CDLL(None).capset


class SandboxError(Exception):
    """A step of entering the sandbox failed; the message names the step and errno."""


@dataclass(frozen=True)
class Choice:
    """The mode a fork server runs in; `why` says why it is "off" when "auto" was asked."""

    mode: str
    why: str = ""


class Probe:
    """The whole sequence run once in a throwaway child and grandchild.

    Started first thing, it runs while the fork server imports the flows
    modules; `choice` waits for its verdict.
    """

    def __init__(self, requested: str, fail_step: str = "") -> None:
        self.requested = requested
        self.pid = 0
        if requested == "off":
            return
        self.report, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.report)
            _probe_child(write_end, fail_step)  # never returns
        os.close(write_end)

    def choice(self) -> Choice:
        """"off" as asked; otherwise the namespace if the probe passed, else why not."""
        if not self.pid:
            return Choice("off")
        with os.fdopen(self.report, "rb") as report:
            said = report.read().decode(errors="replace")
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not said:
            said = f"the probe process ended with status {code}"
        return Choice("off", said) if said else Choice("namespace")


def probe(fail_step: str = "") -> str:
    """Run the probe and wait: "" when the sandbox works here, else what failed."""
    return Probe("namespace", fail_step).choice().why


def _probe_child(report_fd: int, fail_step: str) -> None:
    code = 1
    try:
        enter_namespace(fail_step)
        init = os.fork()
        if init == 0:
            try:
                become_init(fail_step)
                _forced(fail_step, "capset", "capset")
                drop_capabilities()
                code = 0
            except Exception as exc:  # noqa: BLE001 - the probe reports any failure
                os.write(report_fd, str(exc).encode())
            os._exit(code)
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
    except Exception as exc:  # noqa: BLE001 - the probe reports any failure
        os.write(report_fd, str(exc).encode())
    finally:
        os._exit(code)


def enter_namespace(fail_step: str = "") -> None:
    """Unshare PID and mount namespaces (plus a user namespace without root)."""
    flags = CLONE_NEWPID | CLONE_NEWNS
    rootless = os.geteuid() != 0
    if rootless:
        flags |= CLONE_NEWUSER
    uid, gid = os.geteuid(), os.getegid()
    name = "unshare(CLONE_NEWUSER|CLONE_NEWPID|CLONE_NEWNS)" if rootless else \
        "unshare(CLONE_NEWPID|CLONE_NEWNS)"
    _forced(fail_step, "unshare", name)
    _check(name, _unshare(flags) != 0)
    if rootless:
        # Only our own ids: the namespace grants nothing the worker's user lacks.
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")


def become_init(fail_step: str = "") -> None:
    """PID 1's setup: die with our parent, a private mount tree with a fresh /proc,
    then shrink the bounding set and forbid privilege gains for good."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the stub outside dies: we die, and all below
    # Python's SIGINT handler would make init killable from inside by SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Private first, or our /proc mount leaks to the host where "/" is shared.
    _check("making mounts private", _mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0)
    # The host's /proc, and whatever is mounted below it, goes away for us. In a user
    # namespace it is locked in place (EINVAL/EPERM): then the fresh one covers it.
    _umount2(b"/proc", MNT_DETACH)
    _forced(fail_step, "mount", "mounting a fresh /proc")
    _check("mounting a fresh /proc", _mount(
        b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0)
    _shrink_bounding_set()
    _check("setting no_new_privs", not prctl(PR_SET_NO_NEW_PRIVS, 1))
    global INSIDE
    INSIDE = True


def _shrink_bounding_set() -> None:
    # Once per server: what no process below can ever regain, even through exec.
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for cap in range(last + 1):
        if cap not in DOCKER_CAPS:
            _check(f"dropping capability {cap} from the bounding set",
                   not prctl(PR_CAPBSET_DROP, cap))


def _caps_struct(caps: tuple[int, ...]) -> ctypes.Array:
    words = [0, 0]
    for cap in caps:
        words[cap // 32] |= 1 << (cap % 32)
    # Two __user_cap_data_struct: effective, permitted, inheritable per 32-bit word.
    return (ctypes.c_uint32 * 6)(words[0], words[0], 0, words[1], words[1], 0)


_HEADER = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
_ROOT_CAPS = _caps_struct(DOCKER_CAPS)
_NO_CAPS = _caps_struct(())


def drop_capabilities() -> None:
    """One `capset()`: Docker's default set for root, none for any other uid.

    Without it, a root task keeps CAP_SYS_ADMIN, unshares a mount namespace,
    unmounts our /proc and sees the host's again.
    """
    data = _ROOT_CAPS if os.geteuid() == 0 else _NO_CAPS
    if _capset_fast(_HEADER, data) != 0:
        _check("capset", _capset(_HEADER, data) != 0)


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as exc:
        raise SandboxError(f"writing {path} failed: {exc.strerror}") from None


def _check(step: str, failed: bool) -> None:
    if failed:
        err = ctypes.get_errno()
        raise SandboxError(f"{step} failed: {os.strerror(err)}")


def _forced(fail_step: str, here: str, step: str) -> None:
    if fail_step == here:
        raise SandboxError(f"{step} failed: forced by {FAIL_ENV}={here} (test only)")
