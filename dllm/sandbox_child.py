"""The inside of the sandbox: runs in a separate interpreter, never imported by dllm.

`dllm.execution` starts `python -I -B -c <this file's source> FD OPTIONS`: a
zygote. Once, it imports what a run needs and, where the platform allows it
(Linux), enters its own network and mount namespaces, masks home directories and
makes the whole file system read-only. Then, for each job received on the socket
FD (a marshalled payload plus the write ends of an output and a report pipe), it
forks a child which, before anything untrusted runs:
  1. enters new pid, IPC and mount namespaces, with a fresh /proc and a fresh
     tmpfs as its working directory (/tmp) and /dev/shm,
  2. sets resource limits and drops privileges (as root: a throwaway uid; always:
     no capabilities, no-new-privs),
  3. runs the program, then each test case in the program's namespace, and reports
     every test that ran to completion on the report pipe, tagged with a nonce.
A test that was not reported did not pass: exiting early, printing, or closing the
pipe can only lose passes, never earn them. The zygote tells the parent each
child's pid and exit code, and kills a child's process group on request.

Standard library only, and nothing it needs is looked up at run time through a
name the program could rebind: the functions that report are bound before the
program runs.
"""
import ctypes
import fcntl
import marshal
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h).
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                       "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
                       "relatime": MS_RELATIME}
_MESSAGE = struct.Struct("!cq")  # zygote <-> parent: a kind byte, a signed value


class Isolation:
    """What was applied (`features`) and what could not be (`notes`)."""

    def __init__(self, features=(), notes=()):
        self.features, self.notes = list(features), list(notes)

    def add(self, *features):
        self.features.extend(features)

    def note(self, text):
        self.notes.append(text)


def _libc():
    """ctypes handle on libc with errno, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    """Raise OSError with errno when a libc call returned -1."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def _unshare(libc, flags, own_user_ns=False):
    """unshare(2). With own_user_ns (an unprivileged zygote), also a user namespace
    owning the others, our own ids mapped to themselves (no root inside, even by
    name); children inherit its capabilities until they drop them."""
    uid, gid = os.geteuid(), os.getegid()
    if own_user_ns:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if own_user_ns:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


# ---- once per zygote: network and file system ----

def _mount_points():
    """(mount point, per-mount flags) from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # Octal escapes (\040 for a space) in what is otherwise UTF-8.
            point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
            flags = 0
            for option in fields[5].split(","):
                flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
            points.append((point, flags))
    return points


def _is_under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths):
    """Drop paths that lie under another path of the list."""
    kept = []
    for p in sorted(set(paths), key=len):
        if not any(_is_under(p, k) for k in kept):
            kept.append(p)
    return kept


def _cover(libc, directory, options, needed):
    """Mount a fresh tmpfs on `directory`, re-binding read-only the needed paths
    under it (e.g. /root covered, /root/.pyenv/versions/3.11 kept for the interpreter)."""
    keep = _outermost(p for p in needed if _is_under(p, directory))
    fds = [os.open(p, os.O_PATH) for p in keep]  # handles survive the covering
    _mount(libc, "tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in zip(keep, fds):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, exist_ok=True)
        else:  # a file (e.g. a zip on sys.path): bind it onto an empty file
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)


def _mask(libc, hidden, needed):
    """Cover each hidden directory with an empty tmpfs; returns those covered."""
    masked = []
    for directory in _outermost(p for p in hidden if os.path.isdir(p)):
        if not any(_is_under(directory, p) for p in needed):  # not inside the interpreter
            _cover(libc, directory, "mode=0755,size=1m", needed)
            masked.append(directory)
    return masked


def _read_only_everywhere(libc, iso):
    """Remount every mount read-only. Always MS_BIND (per-mount flags): the
    superblock, shared with the host, is never touched."""
    for point, flags in _mount_points():
        try:
            _mount(libc, None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            pass  # e.g. a mount point covered by another mount: unreachable anyway
    if os.statvfs("/").f_flag & os.ST_RDONLY:
        iso.add("read-only-fs")
    else:
        iso.note("the file system is writable outside the working directory")


def isolate_zygote(libc, hide_paths, needed, iso):
    """New network and mount namespaces for the zygote and every child it forks:
    no network interface up, home directories masked, all mounts read-only. The
    tree is made private first, so nothing done here propagates to the host."""
    try:
        _unshare(libc, CLONE_NEWNS | CLONE_NEWNET, own_user_ns=os.geteuid() != 0)
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        iso.note(f"no namespaces ({exc}): network, pids and file system not isolated")
        return False
    iso.add("netns", "mountns")
    try:
        masked = _mask(libc, hide_paths, needed)
        if masked:
            iso.add("masked:" + ":".join(masked))
        _read_only_everywhere(libc, iso)
    except OSError as exc:
        iso.note(f"file system isolation incomplete ({exc})")
    return True


# ---- once per job, in the forked child ----

def fork_init(libc, report):
    """Fork the pid namespace's init; the outer process mirrors its end, never returns.

    The outer reports the init's host pid, so the parent can SIGKILL it whatever
    the program does (setsid, clearing its death signal); when the init dies the
    kernel kills everything left in the namespace: no process outlives the run.
    """
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    report("init", pid)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def isolate_job(libc, limits, owner, needed, report, iso):
    """New pid, IPC and mount namespaces; a fresh /proc (only this run's processes),
    and fresh size-capped tmpfs at /tmp (the working directory, owned by `owner`)
    and /dev/shm."""
    try:
        _unshare(libc, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC)
    except OSError as exc:
        iso.note(f"no pid namespace ({exc}): processes may outlive the run")
        return
    fork_init(libc, report)
    iso.add("pidns", "ipcns")
    try:
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        iso.add("fresh-proc")
    except OSError as exc:
        iso.note(f"host /proc visible ({exc})")
    size, inodes = limits["tmpfs_bytes"], limits["tmpfs_inodes"]
    try:
        _cover(libc, "/tmp", f"size={size},nr_inodes={inodes},mode=0700,uid={owner},"
                             f"gid={owner}", needed)
        if os.path.isdir("/dev/shm"):
            _cover(libc, "/dev/shm", f"size={size},nr_inodes={inodes},mode=1777", needed)
    except OSError as exc:
        iso.note(f"no tmpfs working directory ({exc})")
        return
    os.chdir("/tmp")
    os.environ["HOME"] = os.environ["TMPDIR"] = "/tmp"
    iso.add("tmpfs-workdir")


def set_limits(limits, iso):
    """Address space, CPU seconds, processes+threads, file size, open files, no core."""
    wanted = {"RLIMIT_AS": limits["memory_bytes"], "RLIMIT_CPU": limits["cpu_seconds"],
              "RLIMIT_NPROC": limits["processes"], "RLIMIT_FSIZE": limits["file_bytes"],
              "RLIMIT_NOFILE": limits["open_files"], "RLIMIT_CORE": 0}
    for name, value in wanted.items():
        which = getattr(resource, name, None)
        try:
            _, hard = resource.getrlimit(which)
            # CPU: SIGXCPU at the soft limit (catchable), SIGKILL one second later.
            new_hard = value + 1 if name == "RLIMIT_CPU" else value
            if hard != resource.RLIM_INFINITY:
                value, new_hard = min(value, hard), min(new_hard, hard)
            resource.setrlimit(which, (value, new_hard))
        except (ValueError, OSError, TypeError) as exc:
            iso.note(f"{name} not set ({exc})")
    iso.add("rlimits")


def _readable_by(uid, path):
    """Can `uid` (group `uid`, no other groups) reach `path`: every directory on the
    way searchable and the end readable, by owner, group or other permission bits."""
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts) + 1):
        st = os.stat("/".join(parts[:i]))
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == uid else 0
        if not (st.st_mode >> shift) & (1 if stat.S_ISDIR(st.st_mode) else 4):
            return False
    return True


def run_as(uid, needed, iso):
    """The uid to drop to: the throwaway `uid` when we are root and it can read the
    interpreter; else None (we keep our uid; as root, RLIMIT_NPROC then does not bind)."""
    if uid is None or os.geteuid() != 0:
        return None
    if all(_readable_by(uid, p) for p in needed):
        return uid
    iso.note("runs as root: the interpreter is not readable by an unprivileged uid, "
             "so the process cap is not enforced")
    return None


def drop_privileges(libc, uid, iso):
    """Become `uid` if given (so RLIMIT_NPROC binds and root's files are closed);
    then drop every capability and set no-new-privs (setuid binaries give nothing)."""
    if libc:
        for cap in range(64):  # the bounding set needs CAP_SETPCAP: before setuid
            libc.prctl(PR_CAPBSET_DROP, cap)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        iso.add("uid")
    if libc:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        _check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")  # all sets empty
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a uid change cleared it
        iso.add("no-caps", "no-new-privs")


def make_reporter(fd, nonce, write=os.write):
    """report(kind, index, text): one line on the report pipe. Lines are short
    (< PIPE_BUF) so each write is atomic; only str methods touch the text."""
    def report(kind, index, text=""):
        text = text[:1000].replace("\\", "\\\\").replace("\n", "\\n")
        write(fd, f"{nonce} {kind} {index} {text}\n".encode("utf-8", "replace"))
    return report


def describe(exc, tests, type=type, str=str):
    """'Type: message [at test line: source]' for an exception, never raising."""
    try:
        text = f"{type(exc).__name__}: {str(exc)}"[:300]
        tb, where = exc.__traceback__, ""
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if name.startswith("<test "):
                line = tests[int(name[6:-1])].splitlines()[tb.tb_lineno - 1].strip()
                where = f" at test line: {line[:200]}"
            tb = tb.tb_next
        return text + where
    except BaseException:
        return "an exception that cannot be described"


def _flush_streams(stdout=sys.stdout, stderr=sys.stderr):
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def run_untrusted(program, tests, first, report, flush=_flush_streams, exit=os._exit,
                  exec=exec, compile=compile, BaseException=BaseException,
                  describe=describe):
    """Run the program as module `solution`, then tests[first:] in its namespace.

    Every name used after the program starts is a local bound here, so rebinding
    builtins or this module's globals changes nothing; output is flushed before
    each report, and the process ends with os._exit right after the last one (no
    atexit handler or finalizer runs).
    """
    codes = []
    for i in range(first, len(tests)):
        try:
            codes.append((i, compile(tests[i], f"<test {i}>", "exec"), None))
        except BaseException as exc:  # a broken test fails; it does not stop the rest
            codes.append((i, None, describe(exc, tests)))
    module = type(sys)("solution")
    sys.modules["solution"] = module
    try:
        exec(compile(program, "<solution>", "exec"), module.__dict__)
    except BaseException as exc:
        flush()
        report("load_error", first, describe(exc, tests))
        exit(0)
    flush()
    report("loaded", first)
    for i, code, error in codes:
        if error is None:
            try:
                exec(code, module.__dict__)
            except BaseException as exc:
                error = describe(exc, tests)
        flush()
        report("ok" if error is None else "fail", i, error or "")
    exit(0)


def run_job(payload, out_fd, report_fd, libc, needed, iso, isolated):
    """In the forked child: plumb fds, contain, limit, drop privileges, run."""
    os.setsid()  # own process group: the zygote kills it whole
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the zygote
    devnull = os.open(os.devnull, os.O_RDONLY)  # the program gets an empty stdin
    # Lift the sources above the targets first, so no dup2 overwrites a source.
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (devnull, out_fd, out_fd, report_fd)]
    for target, fd in enumerate(sources):
        os.dup2(fd, target)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The zygote's socket and anything else inherited (no fd lies above the limit).
    os.closerange(4, soft if soft != resource.RLIM_INFINITY else 1 << 20)
    os.environ.clear()
    os.environ.update(payload["env"])
    report = make_reporter(3, payload["nonce"])
    uid = run_as(payload["uid"], needed, iso)
    if isolated:
        owner = uid if uid is not None else os.geteuid()
        isolate_job(libc, payload["limits"], owner, needed, report, iso)
    if "tmpfs-workdir" not in iso.features:  # the parent's mkdtemp directory
        os.chdir(payload["workdir"])
        if uid is not None:
            os.chown(".", uid, uid)
    set_limits(payload["limits"], iso)
    drop_privileges(libc, uid, iso)
    notes = "|".join(n.replace("|", "/") for n in iso.notes)
    report("isolation", 0, ",".join(iso.features) + "|" + notes)
    run_untrusted(payload["program"], payload["tests"], payload["first"], report)


# ---- the zygote ----

def interpreter_paths():
    """Real paths this interpreter reads: prefixes, its binary's directory, sys.path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *filter(None, sys.path)}
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


def _receive_job(sock):
    """(payload, [out_fd, report_fd]) from the parent, or None when it has gone."""
    header, fds, _, _ = socket.recv_fds(sock, _MESSAGE.size, 2)
    if len(header) < _MESSAGE.size:
        return None
    kind, size = _MESSAGE.unpack(header)
    if kind != b"J":  # a kill request that arrived after its job ended
        for fd in fds:
            os.close(fd)
        return _receive_job(sock)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return marshal.loads(data), fds


def _kill_group(pid):
    """SIGKILL the child's process group (the child itself if it has none yet)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_child(sock, pid):
    """Wait for the child's exit, obeying kill requests; its exit code (< 0: signal).
    The child is reaped only here, so every kill above targets our own child."""
    watch = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            ready, _, _ = select.select([sock] + ([watch] if watch else []), [], [],
                                        None if watch else 0.005)
            if sock in ready:
                message = sock.recv(_MESSAGE.size)
                if not message or message[:1] == b"K":  # asked to, or the parent left
                    _kill_group(pid)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
    finally:
        if watch is not None:
            os.close(watch)


def zygote(sock_fd, options):
    """Isolate once, then serve jobs one at a time until the parent closes the socket."""
    sock = socket.socket(fileno=sock_fd)
    libc, needed, iso = _libc(), interpreter_paths(), Isolation()
    if libc is None:
        iso.note(f"no namespaces on {sys.platform}: network and file system not isolated")
    elif not options["isolate"]:
        iso.note("isolation disabled by configuration")
    isolated = bool(libc and options["isolate"]
                    and isolate_zygote(libc, options["hide_paths"], needed, iso))
    while (job := _receive_job(sock)) is not None:
        payload, fds = job
        pid = os.fork()
        if pid == 0:
            try:
                run_job(payload, *fds, libc, needed, Isolation(iso.features, iso.notes),
                        isolated)
            except BaseException:  # the trusted set-up failed: say why on stderr
                sys.__excepthook__(*sys.exc_info())
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        sock.sendall(_MESSAGE.pack(b"P", pid))
        sock.sendall(_MESSAGE.pack(b"X", _wait_child(sock, pid)))


if __name__ == "__main__":
    zygote(int(sys.argv[1]), marshal.loads(bytes.fromhex(sys.argv[2])))
