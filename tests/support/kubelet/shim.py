"""The container runtime's part: a shim run as ``python -I -S -c SHIM`` per container."""

from __future__ import annotations

# The container runtime's part, run as `python -I -S -c SHIM` with a JSON spec on stdin.
SHIM = r"""
import ctypes, json, os, signal, sys
spec = json.loads(sys.stdin.buffer.read())
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
FORWARD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2}
signal.pthread_sigmask(signal.SIG_BLOCK, FORWARD)
main = os.fork()
if main == 0:
    os.close(spec["ready_fd"])
    try:
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.chdir(spec["cwd"])
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:
        sys.stderr.write(f"kubelet: cannot run {spec['argv'][0]}: {e}\n")
        sys.stderr.flush()
    os._exit(128)
alive = True

def forward(sig, frame):
    # SIGUSR1 means SIGKILL: a signal sent to us for real would kill us, not the command.
    if alive:
        try:
            os.kill(main, signal.SIGKILL if sig == signal.SIGUSR1 else sig)
        except ProcessLookupError:
            pass

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out

for s in FORWARD:
    signal.signal(s, forward)
signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARD)
os.write(spec["ready_fd"], b"%d\n" % main)  # from now on, signals reach the command
os.close(spec["ready_fd"])
status = 0
while True:
    try:
        pid, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == main:
        alive, status = False, st
    if not alive:  # the container ends with its command: nothing it started survives
        for p in descendants():
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""
