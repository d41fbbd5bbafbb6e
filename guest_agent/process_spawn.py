"""How the agent starts a process on the OS: what to run (`Spec`), on pipes or on a terminal.

Both ways start the program in a new session, so it leads its own process group (timeouts and
signals then reach its descendants too), and leave its exit status to the agent's reaper: nothing
here waits for a child. A program that cannot be started is reported the way a shell reports it
(`not_started`: 127 when not found, 126 otherwise) instead of as an error of the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from guest_agent._fanout import Exited


@dataclass(frozen=True)
class Spec:
    """What to run: a validated request of StartProcess or PtyOpen."""

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    tag: str = ""
    background: bool = False
    stdin: bytes = b""
    keep_stdin_open: bool = False
    timeout: float | None = None
    pty_size: tuple[int, int] | None = None  # (cols, rows) for a terminal


# Runs in the child of a terminal session: the new session leader takes the terminal as its
# controlling tty (so Ctrl-C reaches the foreground job and the shell gets job control), then
# becomes the real program. subprocess cannot do this itself, and fork() without exec in a
# threaded gRPC server is not safe, hence a tiny exec'd helper.
_CTTY_HELPER = (
    "import fcntl,os,sys,termios\n"
    "fcntl.ioctl(0,termios.TIOCSCTTY,0)\n"
    "try:\n"
    " os.execvp(sys.argv[1],sys.argv[1:])\n"
    "except OSError as e:\n"
    " sys.stderr.write('cyberdesk: cannot run %s: %s\\r\\n'%(sys.argv[1],e.strerror))\n"
    " sys.exit(127 if isinstance(e,FileNotFoundError) else 126)\n"
)


class OomScore:
    """Children start at a higher OOM score than the agent, so the kernel kills them first.

    When the instance reaches its memory limit the kernel's OOM killer picks the process with the
    highest badness; by size alone that is often the agent (~45 MB of Python beside many small
    processes of a fork bomb), whose death ends the whole instance. Lowering the agent's score
    needs CAP_SYS_RESOURCE, which neither the agent nor, on some hosts, even the runtime's root
    has; raising a score and going back down to the floor (0 unless root set one) does not. The
    score is per process, so the agent raises its own to `CHILD` for the duration of one spawn
    (the child inherits it at its birth, before it runs) and lowers it back.
    """

    CHILD = 500
    _PATH = "/proc/self/oom_score_adj"

    def __init__(self) -> None:
        self._fd = -1
        try:
            with open(self._PATH) as fh:
                self.agent: int | None = int(fh.read())
            # Kept open: two writes per spawn, no open (procfs ignores the offset of a write).
            self._fd = os.open(self._PATH, os.O_WRONLY | os.O_CLOEXEC)
        except (OSError, ValueError):
            self.agent = None

    @contextlib.contextmanager
    def for_child(self) -> Iterator[None]:
        """Run the body (one spawn) with the agent's score at `CHILD`."""
        agent = self.agent
        if agent is None or agent >= self.CHILD:
            yield
            return
        try:
            self._write(self.CHILD)
        except OSError:
            self.agent = None  # not allowed here: leave scores alone from now on
            yield
            return
        try:
            yield
        finally:
            try:
                self._write(agent)
            except OSError:
                self.agent = None  # stuck at CHILD: no worse than its children, and no more writes

    def _write(self, value: int) -> None:
        os.write(self._fd, str(value).encode())


def set_winsize(fd: int, cols: int, rows: int) -> None:
    """Set the window size of the terminal `fd` (its foreground job gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# Signals the agent's Python ignores (SIGPIPE, SIGXFSZ) must reach a child at their default
# disposition, as subprocess's restore_signals does: an ignored signal stays ignored across exec,
# and `yes | head` would then end with EPIPE errors instead of quietly by SIGPIPE.
_DEFAULT_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ)


class _SpawnWithCwd:
    """glibc's posix_spawnp with a working directory (posix_spawn_file_actions_addchdir_np, glibc 2.29).

    os.posix_spawnp has no way to change directory, so a command with a cwd other than the agent's
    went through subprocess.Popen: 0.45 ms p50 against 0.25 for a posix_spawn (in-process, 400
    interleaved `echo hi` each, load average 16 on the 2-core bench machine). In an instance the
    agent runs in the home directory, so this is the path of every command given a cwd; on the
    bench (agent in the repository) also that of a command without one. The same call as
    os.posix_spawnp(setsid=True, setsigdef=...) makes, plus the chdir action.
    """

    # glibc's values of the attribute flags (spawn.h); Python does not export them.
    _SETSIGDEF = 0x04
    _SETSID = 0x80
    _BUFFER_BYTES = 1024  # > sizeof(posix_spawnattr_t) (336) and of the file actions (80) on x86-64

    def __init__(self) -> None:
        self.available = False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._spawnp = libc.posix_spawnp
            self._init = libc.posix_spawn_file_actions_init
            self._destroy = libc.posix_spawn_file_actions_destroy
            self._addopen = libc.posix_spawn_file_actions_addopen
            self._adddup2 = libc.posix_spawn_file_actions_adddup2
            self._addchdir = libc.posix_spawn_file_actions_addchdir_np
            attr_init, setflags, setsigdefault = (
                libc.posix_spawnattr_init,
                libc.posix_spawnattr_setflags,
                libc.posix_spawnattr_setsigdefault,
            )
            sigemptyset, sigaddset = libc.sigemptyset, libc.sigaddset
        except (OSError, AttributeError):  # not glibc, or older than 2.29
            return
        self._spawnp.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        self._addopen.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
        self._adddup2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._addchdir.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        # The attributes are the same for every spawn and only read by it: made once.
        self._attr = ctypes.create_string_buffer(self._BUFFER_BYTES)
        sigdef = ctypes.create_string_buffer(self._BUFFER_BYTES)
        if attr_init(self._attr) or sigemptyset(sigdef):
            return
        for sig in _DEFAULT_IN_CHILD:
            if sigaddset(sigdef, int(sig)):
                return
        if setsigdefault(self._attr, sigdef) or setflags(self._attr, ctypes.c_short(self._SETSID | self._SETSIGDEF)):
            return
        self.available = True

    def spawn(
        self, argv: list[str], env: Mapping[str, str], cwd: str, stdin_fd: int | None, out_w: int, err_w: int
    ) -> int:
        """Start `argv` (searched on the agent's PATH) in `cwd` on the given pipe ends; its pid, or OSError."""
        actions = ctypes.create_string_buffer(self._BUFFER_BYTES)
        if self._init(actions):
            raise OSError(ctypes.get_errno(), "posix_spawn_file_actions_init failed")
        try:
            ok = self._addchdir(actions, os.fsencode(cwd)) == 0
            if stdin_fd is not None:
                ok = ok and self._adddup2(actions, stdin_fd, 0) == 0
            else:
                ok = ok and self._addopen(actions, 0, os.fsencode(os.devnull), os.O_RDONLY, 0) == 0
            ok = ok and self._adddup2(actions, out_w, 1) == 0 and self._adddup2(actions, err_w, 2) == 0
            if not ok:
                raise OSError(ctypes.get_errno() or 12, "cannot prepare the spawn's file actions")
            args = [os.fsencode(a) for a in argv]
            c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
            pairs = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
            c_env = (ctypes.c_char_p * (len(pairs) + 1))(*pairs, None)
            pid = ctypes.c_int()
            # Returns the errno of a failed clone or exec (glibc reports the child's exec error).
            err = self._spawnp(ctypes.byref(pid), args[0], actions, self._attr, c_argv, c_env)
        finally:
            self._destroy(actions)
        if err:
            raise OSError(err, os.strerror(err), argv[0])  # ENOENT is a FileNotFoundError, and so on
        return pid.value


_SPAWN_WITH_CWD = _SpawnWithCwd()


def spawn_on_pipes(spec: Spec, stdin_fd: int | None, out_w: int, err_w: int) -> int:
    """Start `spec.argv` in a new session on the given pipe ends; its pid. OSError when it cannot start.

    posix_spawnp (glibc: a vfork-style clone, then exec; a failed exec is reported back as
    FileNotFoundError/PermissionError) took 0.16-0.20 ms in the agent where subprocess.Popen took
    0.22-0.30 ms (median of 500 `echo hi`, measured on the 2-core bench machine). It searches the
    agent's own PATH, not the child's, so it is used only when the child's PATH is the agent's (the
    usual case); a cwd other than the agent's takes glibc's chdir file action (`_SpawnWithCwd`),
    and only where that is missing does subprocess do the work. It does not close the agent's
    other descriptors, which is safe because every one of them is close-on-exec (Python, gRPC,
    inotify and the X11 library open them so; a test checks that a child sees nothing but 0, 1
    and 2).
    """
    argv = list(spec.argv)
    env = dict(spec.env)
    path = os.environ.get("PATH")
    try:
        same_dir = spec.cwd == os.getcwd()
    except OSError:  # our own working directory was removed
        same_dir = False
    if path is not None and env.get("PATH") == path:
        if same_dir:
            actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
                (os.POSIX_SPAWN_DUP2, stdin_fd, 0)
                if stdin_fd is not None
                else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ]
            return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_IN_CHILD)
        if _SPAWN_WITH_CWD.available:
            return _SPAWN_WITH_CWD.spawn(argv, env, spec.cwd, stdin_fd, out_w, err_w)
    popen = subprocess.Popen(
        argv,
        stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        cwd=spec.cwd,
        env=env,
        start_new_session=True,
    )
    # Our reaper collects the status; tell subprocess not to try (its own waitpid would race us).
    popen.returncode = 0
    return popen.pid


def spawn_on_terminal(spec: Spec, terminal: int) -> int:
    """Start `spec.argv` in a new session whose controlling terminal is the pty slave `terminal`; its pid."""
    popen = subprocess.Popen(
        [sys.executable, "-S", "-E", "-c", _CTTY_HELPER, *spec.argv],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=spec.cwd,
        env=dict(spec.env),
        start_new_session=True,
    )
    # Our reaper collects the status; tell subprocess not to try (its own waitpid would race us).
    popen.returncode = 0
    return popen.pid


def not_started(program: str, err: OSError) -> Exited:
    """The exit reported for a program that could not be started (127 not found, 126 otherwise), as a shell does."""
    if isinstance(err, FileNotFoundError):
        code, text = 127, f"command not found: {program}"
    elif isinstance(err, PermissionError):
        code, text = 126, f"permission denied: {program}"
    else:
        code, text = 126, f"cannot run {program}: {err.strerror or err}"
    return Exited(exit_code=code, signal=0, timed_out=False, error=text, end_time=time.time())


def login_shell() -> list[str]:
    """The default program of a terminal: a login bash (or sh where bash is missing)."""
    return ["bash", "-l"] if shutil.which("bash") else ["sh", "-l"]
