"""The Linux system calls and mount set-up of the sandbox's runner (see runner.py, which loads this
file by path). Standard library only, through ctypes (Python 3.11 has no os.unshare or mount)."""

import os
import sys

PAGE = 4096  # tmpfs counts whole pages


class Linux:
    """The few Linux system calls the sandbox needs, through ctypes (Python 3.11 has no os.unshare)."""

    PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
    CLONE_NEWUSER = 0x10000000
    NAMESPACES = (("mntns", 0x00020000), ("pidns", 0x20000000), ("netns", 0x40000000), ("ipcns", 0x08000000))
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
    MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
    MNT_DETACH = 2
    # Landlock: system call numbers (the same on every architecture for calls numbered 424 and
    # up, except alpha and mips) and access rights, from <linux/landlock.h>.
    SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def _check(self, ret, what):
        if ret < 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def prctl(self, option, value):
        c = self.ctypes.c_ulong
        return self._check(self.libc.prctl(option, c(value), c(0), c(0), c(0)), f"prctl({option})")

    def unshare(self, flags):
        self._check(self.libc.unshare(flags), "unshare")

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)
        ret = self.libc.mount(enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data))
        self._check(ret, f"mount {target}")

    def umount(self, target):
        self._check(self.libc.umount2(os.fsencode(target), self.MNT_DETACH), f"umount {target}")

    def enter_user_namespace(self):
        """A user namespace in which this (unprivileged) user may create the other namespaces."""
        uid, gid = os.getuid(), os.getgid()
        self.unshare(self.CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)

    def drop_privileges(self):
        """no_new_privs, then an empty capability set (what remains of root's, or the user namespace's)."""
        ctypes = self.ctypes
        self.prctl(self.PR_SET_NO_NEW_PRIVS, 1)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, all zero
        self._check(self.libc.capset(ctypes.byref(header), data), "capset")

    def landlock(self, root, net, hide, readable):
        """Restrict this process and its children; returns what was enforced.

        Writes: only below `root` (and /dev/null). Reads: everywhere except below /proc (other
        processes' environ: Landlock's ptrace rule covers /proc/PID/mem but not environ) and the
        `hide` folders (temporary folders, the evaluator's home), but including the `readable`
        paths (the interpreter's) wherever they are. Executing stays allowed."""
        ctypes = self.ctypes
        if os.uname().machine.startswith(("alpha", "mips")):
            raise OSError("Landlock system call numbers differ on this architecture")
        create, add_rule, restrict = self.SYS_LANDLOCK
        abi = self._check(self.libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1)), "landlock ABI")
        write_file, read_file, read_dir, truncate = 1 << 1, 1 << 2, 1 << 3, 1 << 14
        fs = write_file | read_file | read_dir | sum(1 << bit for bit in range(4, 13))  # remove, make...
        if abi >= 2:
            fs |= 1 << 13  # REFER: moving files between folders
        if abi >= 3:
            fs |= truncate
        read = lambda path: read_file | read_dir if os.path.isdir(path) else read_file
        rules = [(root, fs), ("/dev/null", fs & (read_file | write_file | truncate)), ("/proc/self", read_file | read_dir)]
        rules += [(p, read(p)) for p in readable if os.path.exists(p)]
        excluded = {os.path.realpath(p) for p in [*hide, "/proc"]} - {"/"}

        def allow_all_but_excluded(folder):
            # Landlock rules only allow: list the folder and allow each entry that is not
            # excluded, going down into the entries that hold an excluded folder.
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                real = os.path.realpath(path)
                if real in excluded or not os.path.exists(path):
                    continue
                if any(e.startswith(real.rstrip("/") + "/") for e in excluded) and os.path.isdir(real):
                    allow_all_but_excluded(real)
                else:
                    rules.append((path, read(path)))

        allow_all_but_excluded("/")

        class Ruleset(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        done = {"landlock"}
        ruleset, size = Ruleset(fs, 0, 0), 8
        if abi >= 4 and net:
            ruleset.net, size = 0b11, 16  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
            done.add("landlock-net")
        if abi >= 6:
            ruleset.scoped, size = 0b11, 24  # abstract unix sockets and signals stay inside
            done.add("landlock-scope")
        fd = self._check(self.libc.syscall(create, ctypes.byref(ruleset), ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
        try:
            for path, allowed in rules:
                target = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    rule = PathBeneath(allowed, target)
                    self._check(self.libc.syscall(add_rule, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)), "landlock_add_rule")
                finally:
                    os.close(target)
            self.prctl(self.PR_SET_NO_NEW_PRIVS, 1)  # required by landlock_restrict_self
            self._check(self.libc.syscall(restrict, ctypes.c_int(fd), ctypes.c_uint32(0)), "landlock_restrict_self")
        finally:
            os.close(fd)
        return done


def mount_table():
    """(mount point, per-mount options, file system type) for each line of /proc/self/mountinfo."""
    def unescape(text):  # the kernel writes space, tab, newline and backslash as \\ooo
        head, *rest = text.split("\\")
        return head + "".join(chr(int(part[:3], 8)) + part[3:] for part in rest)

    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-", 6) + 1]
            yield unescape(fields[4]), fields[5].split(","), fstype


def private_mounts(linux, root, uid, gid, pidns, hide):
    """init, in the new mount namespace: `hide` covered, everything read-only except `root`, and
    a private /proc."""
    L = linux
    # Nothing done here may propagate back to the evaluator's mounts.
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    cover(hide, [*(p for p in sys.path if p), root], linux, uid, gid)
    L.mount(root, root, None, L.MS_BIND)  # its own mount, so it can stay writable
    inside = lambda p: p == root or p.startswith(root.rstrip("/") + "/")
    keep = {"nosuid": L.MS_NOSUID, "nodev": L.MS_NODEV, "noexec": L.MS_NOEXEC, "noatime": L.MS_NOATIME,
            "nodiratime": L.MS_NODIRATIME, "relatime": L.MS_RELATIME}
    table = list(mount_table())
    for point, options, fstype in table:
        if inside(point):
            continue
        if pidns and fstype == "proc" and point != "/proc":
            L.umount(point)  # another view of the evaluator's processes
            continue
        # The flags a bind remount must repeat (in a user namespace, changing them is refused).
        flags = L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | sum(v for k, v in keep.items() if k in options)
        if "noatime" not in options and "relatime" not in options:
            flags |= L.MS_STRICTATIME
        try:
            L.mount(None, point, None, flags)
        except OSError as e:
            # EINVAL/ENOENT: the point is covered by a later mount (stacked, or below a mount over
            # its parent), so it cannot be reached; the check below looks at what can.
            if e.errno not in (22, 2):
                raise
    for point, _, fstype in table:
        if inside(point) or (pidns and fstype == "proc" and point != "/proc"):
            continue
        try:
            writable = not os.statvfs(point).f_flag & os.ST_RDONLY
        except OSError:
            continue
        if writable:
            raise OSError(f"{point} is still writable")
    if pidns:
        # The new PID namespace's own /proc: the evaluator's processes are not in it.
        L.mount("proc", "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC | L.MS_RDONLY)


def cover(hide, needed, linux, uid, gid):
    """Put an empty tmpfs over each folder in `hide` (temporary folders, /run, the evaluator's
    home: other users' files, secrets, and unix sockets such as docker.sock or a tmux server,
    which a read-only mount does not stop `connect` from reaching), and, when the program will run
    as `uid`, over each folder closed to it (e.g. /root, mode 700, holding the interpreter). The
    `needed` paths below a covered folder (the interpreter's, the working folder) are bind-mounted
    back at their own place."""

    def allows(st, bits):
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        return (st.st_mode >> shift) & bits == bits

    covered = {os.path.realpath(p) for p in hide if os.path.isdir(p)} - {"/"}
    needed = [os.path.realpath(p) for p in needed if os.path.exists(p)]
    if uid is not None:
        for path in needed:
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                folder = "/" + "/".join(parts[:i])
                if not allows(os.stat(folder), 1):
                    covered.add(folder)
                    break
    below = lambda path, folder: path.startswith(folder.rstrip("/") + "/")
    for folder in sorted(covered):
        if any(below(folder, other) for other in covered):
            continue  # inside another covered folder: that tmpfs hides it already
        keep = [p for p in dict.fromkeys(needed) if below(p, folder)]
        sources = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in keep]
        linux.mount("tmpfs", folder, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=1m")
        for path, fd in sources:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                open(path, "w").close()
            linux.mount(f"/proc/self/fd/{fd}", path, None, linux.MS_BIND | linux.MS_REC)
            os.close(fd)


def mount_quota(linux, root, program, disk_bytes, inodes, uid, gid):
    """init, after private_mounts: a tmpfs limited to `disk_bytes` and `inodes` over `root`, holding
    a copy of the `program` file. The kernel answers ENOSPC to a write or a new file past either
    limit, so a program cannot fill the evaluator's disk or inode table; the tmpfs and what is in
    it go away with the mount namespace, when the run ends. Its own source and the folder itself
    come on top of the quota."""
    with open(program, "rb") as f:
        source = f.read()
    size = disk_bytes + -(-len(source) // PAGE) * PAGE + PAGE
    options = f"size={size},nr_inodes={inodes + 2},mode=0700"
    if uid is not None:
        options += f",uid={uid},gid={gid}"  # the folder belongs to the uid the program runs as
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, options)
    fd = os.open(program, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(source)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
