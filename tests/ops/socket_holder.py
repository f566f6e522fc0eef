"""A stand-in for systemd's socket activation, where PID 1 is not systemd: it binds a unix
socket and listens, then starts a command (the proxy) with that socket as descriptor 3,
`LISTEN_FDS=1`, `LISTEN_FDNAMES` and `LISTEN_PID` set to the command's own pid, as systemd does
for the service of a `.socket` unit. It keeps the socket open while the command stops and
starts again, so connections made meanwhile wait in the backlog, as under
`systemctl restart`.

Usage: socket_holder.py --path PATH [--mode 0660] [--backlog N] -- COMMAND [ARGS...]

It prints `listening <path>`, then obeys commands read from stdin, one a line:
  start    start COMMAND; prints `started <pid>`
  stop     SIGTERM COMMAND and wait for it; prints `stopped <exit code>`
  restart  stop, then start (as `systemctl restart`); prints both lines
  quit     stop COMMAND if it runs, close the socket (its file stays), exit
COMMAND's stdout and stderr go to this script's stderr. Runs alone, outside pytest
(tests/ops/test_systemd_units.py, tests/e2e/test_upgrade.py), so descriptor 3 is its own.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys

LISTEN_FD = 3  # SD_LISTEN_FDS_START
# LISTEN_PID must be the pid of the process that takes the socket: the shell's own ($$), which
# exec keeps.
WRAPPER = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


def listen(path, mode, backlog):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(backlog)
    if sock.fileno() != LISTEN_FD:
        os.dup2(sock.fileno(), LISTEN_FD)
    os.set_inheritable(LISTEN_FD, True)
    return sock


class Service:
    def __init__(self, command):
        self.command = command
        self.proc = None

    def start(self):
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="rpc_proxy.socket")
        self.proc = subprocess.Popen(
            ["sh", "-c", WRAPPER, "sh", *self.command],
            env=env,
            pass_fds=(LISTEN_FD,),
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=sys.stderr,
        )
        return f"started {self.proc.pid}"

    def stop(self):
        if self.proc is None:
            return "stopped none"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return f"stopped {code}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--mode", default="0660", type=lambda text: int(text, 8))
    parser.add_argument("--backlog", default=4096, type=int)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    sock = listen(args.path, args.mode, args.backlog)
    service = Service(command)
    print(f"listening {args.path}", flush=True)
    for line in sys.stdin:
        verb = line.strip()
        if verb == "start":
            print(service.start(), flush=True)
        elif verb == "stop":
            print(service.stop(), flush=True)
        elif verb == "restart":
            print(service.stop(), flush=True)
            print(service.start(), flush=True)
        elif verb == "quit":
            break
        elif verb:
            print(f"unknown {verb}", flush=True)
    print(service.stop(), flush=True)
    sock.close()  # descriptor 3, where it is a copy, closes as the process exits


if __name__ == "__main__":
    main()
