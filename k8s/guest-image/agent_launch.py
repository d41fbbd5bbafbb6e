#!/usr/bin/python3 -I
"""Start the guest agent in a VM as the tenant's user, without letting that user read the agent's secrets.

Installed in the image as /usr/local/libexec/cyberdesk/agent-launch; cyberdesk-agent.service runs
it as root:

    agent-launch --user user -- /opt/cyberdesk/venv/bin/python -m guest_agent

The agent's token, TLS certificate and key are files that cloud-init writes from the VM's Secret,
mode 0600 root (/etc/cyberdesk/agent/; the paths come from /etc/cyberdesk/agent.env, the unit's
EnvironmentFile). The agent runs as `user`, and so does every command a tenant runs through it:
if the agent could read those files, so could the tenant's code, which could then serve as the
agent on its port (e.g. across an agent restart). So this launcher, while still root, reads each
file into a pipe, hands the agent the pipe's read end as the variable's new value
(`/proc/self/fd/<n>`, owned by the user so the agent may open it), drops to the user (groups,
gid, uid) and execs the agent. The agent reads each pipe once, at start-up; what is left for the
tenant's commands is an empty pipe. The same trick the local runtime uses for its token
(instance_svc/runtime/local/spawn.py).

Python's -I (isolated mode) in the shebang: this runs as root with an environment from a file,
so neither PYTHON* variables nor the working directory may change what it imports.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys

# The variables naming secret files (guest_agent/config.py reads them).
SECRET_FILE_VARIABLES = ("CYBERDESK_AGENT_TOKEN_FILE", "CYBERDESK_AGENT_TLS_CERT", "CYBERDESK_AGENT_TLS_KEY")
# A pipe holds at least this much without a reader (Linux: 64 KiB); a PEM chain or a token is far smaller.
_PIPE_LIMIT = 60 * 1024


class LaunchError(Exception):
    """Why the agent cannot be started; printed to the journal (never a secret's content)."""


def _secret_pipe(path: str, uid: int, gid: int) -> int:
    """A pipe holding the file's bytes; its read end (inheritable, owned by uid:gid)."""
    try:
        with open(path, "rb") as source:
            data = source.read(_PIPE_LIMIT + 1)
    except OSError as err:
        raise LaunchError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > _PIPE_LIMIT:
        raise LaunchError(f"{path} is larger than {_PIPE_LIMIT} bytes")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    # Opening /proc/self/fd/<n> of a pipe checks the pipe's owner and mode, as for a file. The mode
    # first: changing it after the owner would need CAP_FOWNER, which the unit does not grant.
    os.fchmod(read_end, 0o400)
    os.fchown(read_end, uid, gid)
    os.set_inheritable(read_end, True)
    return read_end


def prepare(env: dict[str, str], user: pwd.struct_passwd) -> dict[str, str]:
    """The agent's environment: secret files replaced by pipes, the user's identity, no inline token."""
    out = dict(env)
    # A token in the environment would be inherited by nothing (the agent pops it) but is visible
    # in /proc/<pid>/environ to the same user: only files are accepted here.
    if out.pop("CYBERDESK_AGENT_TOKEN", None) is not None:
        raise LaunchError("CYBERDESK_AGENT_TOKEN is set; give the token as a file (CYBERDESK_AGENT_TOKEN_FILE)")
    for variable in SECRET_FILE_VARIABLES:
        path = out.get(variable, "")
        if path:
            out[variable] = f"/proc/self/fd/{_secret_pipe(path, user.pw_uid, user.pw_gid)}"
    out.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name, SHELL=user.pw_shell or "/bin/sh")
    return out


def drop_privileges(user: pwd.struct_passwd) -> None:
    """Become `user` for good: its groups, then its gid, then its uid (root cannot be regained)."""
    os.initgroups(user.pw_name, user.pw_gid)
    os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
    os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
    if os.getuid() != user.pw_uid or os.geteuid() != user.pw_uid:
        raise LaunchError("could not drop to the agent's user")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="agent-launch", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--user", required=True, help="the user the agent and the tenant's commands run as")
    parser.add_argument("command", nargs="+", help="the agent's command line (after --)")
    args = parser.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise LaunchError("agent-launch must start as root (it reads the root-only secret files)")
        try:
            user = pwd.getpwnam(args.user)
        except KeyError:
            raise LaunchError(f"no user {args.user!r}") from None
        if user.pw_uid == 0:
            raise LaunchError("the agent must not run as root")
        env = prepare(dict(os.environ), user)
        drop_privileges(user)
        os.chdir(user.pw_dir if os.path.isdir(user.pw_dir) else "/")
        os.execvpe(args.command[0], args.command, env)
    except LaunchError as err:
        print(f"agent-launch: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"agent-launch: cannot start {args.command[0]}: {err.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
