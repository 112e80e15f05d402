"""A container's first process: enter the pod's namespaces, build its file system view, exec the program.

Run by the node agent as ``python -I -S launch.py SPEC`` (see ``command``; standard library only,
so that it starts in milliseconds and needs no import path). It does what a
low-level container runtime does for the sandbox, with Linux namespaces and no
images:

* ``pause``: the pod's network and UTS namespaces (the hostname is the pod's
  name; the agent joins the network to the pod network), held by a sleeping
  process, as the kubelet's pause container holds them.
* ``run``: join the pod's namespaces and make a mount namespace (the agent is
  root, or root in its own user namespace). The root file system is a small
  tmpfs holding, for each of this machine's top-level folders, a copy-on-write
  overlay whose writes land in the container's own layer (a tmpfs that goes
  with the container), or a read-only bind where the kernel refuses an overlay;
  a private ``/tmp`` and ``/dev/shm``; and the pod's volumes at their mount paths. A mount path
  inside a read-only folder is made by shadowing that folder with a tmpfs of
  binds of its entries, and symbolic links on the way are followed inside the
  new root, so this machine's folders are never written. The sandboxes' state
  folders (certificates) and their pods' runtime folders are hidden. Then
  ``pivot_root`` and exec.
* ``join``: enter a running container's namespaces (``/proc/PID/ns``) and exec a
  command there: ``kubectl exec``, exec probes and hooks, injected load (``runtime.py``).
* ``plain``: exec the command as it is (where this machine grants no namespaces).
* ``check``: say whether this machine lets the agent make namespaces at all.

Errors go to stderr with exit code 127 (the container's log shows them), as a
runtime's "failed to create container task" does.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import os
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the syscall tables were unified)
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
PR_SET_PDEATHSIG = 1
TIOCSCTTY = 0x540E
SKIP_TOP = {"proc", "sys", "dev", "tmp", "lost+found"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class LaunchError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(code)}")


def _b(path: str | None) -> bytes | None:
    return path.encode() if path is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {source or fstype} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def read_only(target: str) -> None:
    """Make a bind mount and everything under it read-only (mount_setattr, else the top mount only)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    AT_FDCWD = -100
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, _b(target), AT_RECURSIVE, ctypes.byref(attr),
                     ctypes.sizeof(attr)) == 0:  # fmt: skip
        return
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def bind(source: str, target: str, readonly: bool) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        read_only(target)


def make_like(source: str, target: str) -> bool:
    """Create at ``target`` a mount point (or symlink) like ``source``; False if source is not mountable."""
    try:
        info = os.lstat(source)
    except OSError:
        return False
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
        return False
    if stat.S_ISDIR(info.st_mode):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    return True


def shadow(root: str, folder: str) -> None:
    """Replace the read-only view of host ``folder`` with a writable tmpfs of binds of its entries."""
    target = root + folder
    entries = sorted(os.listdir(folder))
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    for name in entries:
        source = os.path.join(folder, name)
        inner = os.path.join(target, name)
        if make_like(source, inner):
            bind(source, inner, readonly=True)


def ensure_path(root: str, path: str, is_dir: bool) -> str:
    """Make ``path`` exist in the new root (as a dir or a file), shadowing host folders on the way.

    Symbolic links met on the way (``/var/run`` -> ``/run``) are followed inside the new root, never
    out to this machine's own folders. Returns the real location under ``root``.
    """
    current = "/"
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = os.path.dirname(current)
            continue
        nxt = os.path.join(current, part)
        if os.path.islink(root + nxt):
            hops += 1
            if hops > 40:
                raise LaunchError(f"too many levels of symbolic links in {path}")
            target = os.readlink(root + nxt)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                current = "/"
            continue
        if not os.path.lexists(root + nxt):
            make = (lambda p: open(p, "a").close()) if not parts and not is_dir else os.mkdir
            try:
                make(root + nxt)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                shadow(root, current)
                make(root + nxt)
        current = nxt
    return root + current


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4].replace("\\040", " ") for line in handle]


def _has_submounts(folder: str, points: list[str]) -> bool:
    return any(point.startswith(folder + "/") for point in points)


def _overlay(source: str, target: str, layer: str) -> bool:
    """A writable copy-on-write view of host ``source`` at ``target`` (the container's own layer);
    False where the kernel refuses (the caller falls back to a read-only bind)."""
    upper, work = layer + "/upper", layer + "/work"
    os.makedirs(upper)
    os.makedirs(work)
    options = f"lowerdir={source},upperdir={upper},workdir={work}"
    for extra in ("", ",userxattr"):  # user namespaces need user.* extended attributes
        if _libc.mount(b"overlay", target.encode(), b"overlay", MS_NOSUID, (options + extra).encode()) == 0:
            return True
    return False


def loopback_up() -> None:
    """Bring up ``lo`` (SIOCSIFFLAGS on a struct ifreq), without importing the socket module."""
    AF_INET, SOCK_DGRAM = 2, 2
    fd = _libc.socket(AF_INET, SOCK_DGRAM, 0)
    if fd < 0:
        raise LaunchError(f"socket: {os.strerror(ctypes.get_errno())}")
    try:
        request = ctypes.create_string_buffer(b"lo".ljust(16, b"\0") + (IFF_UP | IFF_LOOPBACK | IFF_RUNNING).to_bytes(2, sys.byteorder), 40)
        _check(_libc.ioctl(fd, SIOCSIFFLAGS, request), "bring up the loopback interface")
    finally:
        os.close(fd)


def build_root(spec: dict) -> None:
    root = spec["rootfs"]
    os.makedirs(root, exist_ok=True)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID, "mode=755,size=16m")
    layers = spec["layers"]
    os.makedirs(layers, exist_ok=True)
    mount("tmpfs", layers, "tmpfs", MS_NOSUID, "mode=755,size=" + spec.get("layer_size", "256m"))
    nested = _mount_points()
    for name in sorted(os.listdir("/")):
        if name in SKIP_TOP:
            continue
        source, target = "/" + name, root + "/" + name
        if make_like(source, target) and not (os.path.isdir(source) and not _has_submounts(source, nested)
                                              and _overlay(source, target, layers + "/" + name)):  # fmt: skip
            bind(source, target, readonly=True)
    for name, readonly in (("proc", False), ("sys", True), ("dev", False)):
        os.mkdir(root + "/" + name)
        bind("/" + name, root + "/" + name, readonly=readonly)
    if os.path.isdir(root + "/dev/shm"):  # a shared-memory folder of its own, as a runtime gives a container
        mount("shm", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    os.mkdir(root + "/tmp", 0o1777)
    bind(spec["tmp"], root + "/tmp", readonly=False)
    for kept in spec.get("keep", []):  # this Python and labkit, when they live under the private /tmp
        bind(kept, ensure_path(root, kept, is_dir=True), readonly=True)
    for hidden in spec.get("hide", []):
        if os.path.isdir(root + hidden):
            mount("tmpfs", root + hidden, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=755")
    for item in spec.get("mounts", []):
        source = item["source"]
        target = ensure_path(root, item["path"], os.path.isdir(source))
        bind(source, target, readonly=item.get("readOnly", False))
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def pause(spec: dict) -> None:
    """The pod's own network and UTS namespaces, held by a sleeping process (the kubelet's pause
    container): every container of the pod joins them, so they share localhost and the hostname."""
    _check(_libc.unshare(CLONE_NEWUTS | CLONE_NEWNET), "unshare")
    name_and_loopback(spec)


def name_and_loopback(spec: dict) -> None:
    hostname = spec.get("hostname", "")[:63].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    loopback_up()


def weigh(nice: int) -> None:
    """Take the container's CPU weight (a nice level; see the agent's cpuweight.py) for this process
    and its session's scheduler autogroup, before anything of the container runs. Best effort."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        with open("/proc/self/autogroup", "w") as handle:
            handle.write(str(nice))
    except OSError:
        pass  # no autogroups here, or (unprivileged) the kernel's limit of one change per 100 ms


def run(spec: dict) -> None:
    """Join the pod's namespaces (its pause process), then a mount namespace and root of its own."""
    join(spec["pod_pid"], ("user", "uts", "net"), required=("uts", "net"))
    name_and_loopback(spec)  # again, in case the pause process is a bare `unshare` (cheap, idempotent)
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    build_root(spec)


NAMESPACES = {"user": CLONE_NEWUSER, "mnt": CLONE_NEWNS, "uts": CLONE_NEWUTS, "net": CLONE_NEWNET}


def join(pid: int, kinds: tuple[str, ...] = ("user", "mnt", "uts", "net"), required: tuple[str, ...] = ()) -> None:
    """Enter the namespaces of process ``pid`` (user first, when it is not ours); the ``required``
    ones must differ from ours (a pod's own network, never this machine's)."""
    for kind in kinds:
        path = f"/proc/{pid}/ns/{kind}"
        if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino:
            if kind in required:
                raise LaunchError(f"the pod's {kind} namespace is not ready")
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            _check(_libc.setns(fd, NAMESPACES[kind]), f"enter the pod's {kind} namespace")
        finally:
            os.close(fd)


def check() -> None:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWNET), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", 0, "size=4k")


def command(spec: dict, file: str | None = None) -> list[str]:
    """The command that runs this launcher with ``spec``: written to ``file`` (a container's, kept for
    a look afterwards) or passed inline. marshal, not JSON: it costs the launcher no import."""
    data = marshal.dumps(spec)
    if file is None:
        argument = data.hex()
    else:
        with open(file, "wb") as handle:
            handle.write(data)
        argument = file
    return [sys.executable, "-I", "-S", __file__, argument]


def main() -> None:
    argument = sys.argv[1]
    if os.path.isabs(argument):
        with open(argument, "rb") as handle:
            spec = marshal.loads(handle.read())
    else:
        spec = marshal.loads(bytes.fromhex(argument))
    mode = spec.get("mode", "run")
    quiet = spec.get("quiet", False)  # an exec's failure reaches its client as a status, not as output
    if "nice" in spec:
        weigh(spec["nice"])
    _libc.prctl(PR_SET_PDEATHSIG, 9)  # the container dies with the agent thread that started it (SIGKILL)
    if spec.get("tty"):  # its terminal (stdout) becomes its controlling terminal: ^C and window sizes reach it
        _libc.ioctl(1, TIOCSCTTY, 0)
    # Opened now: the new root hides the agent's folders. Closed by exec (Python's fds are close-on-exec).
    errors = os.open(spec["error_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if spec.get("error_file") else None
    try:
        if mode == "check":
            check()
            return
        if mode == "run":
            run(spec)
        elif mode == "pause":
            pause(spec)
        elif mode == "join":
            join(spec["pid"], required=tuple(spec.get("required", ())))
        cwd = spec.get("cwd") or "/"
        if mode == "run":
            ensure_path("", cwd, is_dir=True)  # a missing working directory is created, as runc does
        os.chdir(cwd)
    except (LaunchError, OSError) as exc:
        fail(errors, f"failed to create the container: {exc}", quiet)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        fail(errors, f"exec: \"{argv[0]}\": {exc.strerror}", quiet)


def fail(errors: int | None, message: str, quiet: bool) -> None:
    """Tell the agent (the spec's ``error_file``) and, unless ``quiet``, the container's log; exit 127."""
    if errors is not None:
        os.write(errors, message.encode())
    if not quiet:
        print(f"labkit: {message}", file=sys.stderr, flush=True)
    os._exit(127)


if __name__ == "__main__":
    main()
