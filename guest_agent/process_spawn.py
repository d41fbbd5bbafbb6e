"""How the agent starts a process on the OS: what to run (`Spec`), on pipes or on a terminal.

Both ways start the program in a new session, so it leads its own process group (timeouts and
signals then reach its descendants too), and leave its exit status to the agent's reaper: nothing
here waits for a child. A program that cannot be started is reported the way a shell reports it
(`not_started`: 127 when not found, 126 otherwise) instead of as an error of the call.
"""

from __future__ import annotations

import contextlib
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


def spawn_on_pipes(spec: Spec, stdin_fd: int | None, out_w: int, err_w: int) -> int:
    """Start `spec.argv` in a new session on the given pipe ends; its pid. OSError when it cannot start.

    posix_spawnp (glibc: a vfork-style clone, then exec; a failed exec is reported back as
    FileNotFoundError/PermissionError) took 0.16-0.20 ms in the agent where subprocess.Popen took
    0.22-0.30 ms (median of 500 `echo hi`, measured on the 2-core bench machine). It cannot change
    directory and searches
    the agent's own PATH, not the child's, so it is used only when neither differs (the usual case:
    the agent runs in the home directory, the default cwd); otherwise subprocess does the work. It
    does not close the agent's other descriptors, which is safe because every one of them is
    close-on-exec (Python, gRPC, inotify and the X11 library open them so; a test checks that a
    child sees nothing but 0, 1 and 2).
    """
    argv = list(spec.argv)
    env = dict(spec.env)
    path = os.environ.get("PATH")
    try:
        same_dir = spec.cwd == os.getcwd()
    except OSError:  # our own working directory was removed
        same_dir = False
    if same_dir and path is not None and env.get("PATH") == path:
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0)
            if stdin_fd is not None
            else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_IN_CHILD)
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
