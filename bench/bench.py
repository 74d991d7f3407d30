"""chunkvol benchmarks: every figure is a ratio to a peer measured in the
same run on the same backing storage (the machines are noisy). See
docs/BENCHMARKS.md for the latest table; bench/run regenerates it."""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

QUICK = "--quick" in sys.argv
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CV = os.path.join(ROOT, "target/release/chunkvol")
WORK = os.environ.get("BENCH_DIR", "/var/tmp/chunkvol-bench")
REPS = 1 if QUICK else 3
GIB = 1 << 30
MIB = 1 << 20
def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    os.makedirs(WORK, exist_ok=True)
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", WORK], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} x {cpu}, {mem / (1 << 20):.0f} GiB RAM, Linux {os.uname().release}, backing files on {fs}"


results = {"quick": QUICK, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "sections": {}}
commands = []


def sh(cmd, check=True, record=True, **kw):
    if record:
        line = cmd if isinstance(cmd, str) else " ".join(cmd)
        if line not in commands:
            commands.append(line)
    r = subprocess.run(cmd, shell=isinstance(cmd, str), check=False, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def timed(cmd, **kw):
    t = time.perf_counter()
    r = sh(cmd, **kw)
    return time.perf_counter() - t, r


def drop_caches():
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)


def fresh(name):
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def random_file(path, size):
    if not os.path.exists(path) or os.path.getsize(path) != size:
        sh(f"head -c {size} /dev/urandom > {path}")


def allocated_ranges(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, stop
            pos = stop
    finally:
        os.close(fd)


def allocated_bytes(path):
    return sum(b - a for a, b in allocated_ranges(path))


def read_allocated(path):
    # dd with large blocks per allocated range: the kernel's read path with
    # no user-space copy overhead to speak of.
    for a, b in allocated_ranges(path):
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=skip_bytes,count_bytes",
                        f"skip={a}", f"count={b - a}"], check=True, capture_output=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc):
    for _ in range(400):
        if proc.poll() is not None:
            raise RuntimeError("server exited early")
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=0.2)
            # A connect to a free local port can pick that same port as its
            # source and "succeed" by connecting to itself.
            self_connected = c.getsockname() == c.getpeername()
            c.close()
            if not self_connected:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not start")


class Serve:
    def __init__(self, argv, port):
        self.port = port
        self.log = open(os.path.join(WORK, f"server-{port}.log"), "w")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=self.log)
        commands.append(" ".join(argv))
        t = time.perf_counter()
        wait_port(port, self.p)
        print(f"  {argv[0].split('/')[-1]} up on {port} after {time.perf_counter() - t:.3f}s", flush=True)

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def fio(uri, rw, bs, depth, secs, jobs=1, extra=()):
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", f"--numjobs={jobs}", "--size=512M", "--time_based",
           f"--runtime={secs}", "--group_reporting", "--output-format=json", *extra]
    r = sh(cmd, check=False)
    if r.returncode != 0:
        ss = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        raise RuntimeError(f"fio failed on {uri}:\n{r.stderr[-2000:]}\nlisteners:\n{ss}")
    j = json.loads(r.stdout[r.stdout.find("{"):])["jobs"][0]
    side = "read" if "read" in rw else "write"
    return {"iops": j[side]["iops"], "bw_bytes": j[side]["bw_bytes"]}


def median(xs):
    return statistics.median(xs)


# ---- 1. open time and memory vs data size ---------------------------------
def bench_open():
    sizes = [1, 2] if QUICK else [int(x) for x in os.environ.get("BENCH_OPEN_SIZES", "1,8,32").split(",")]
    d = fresh("open")
    src = os.path.join(WORK, "rand-1g.bin")
    random_file(src, GIB)
    rows = []
    for gib in sizes:
        dev = os.path.join(d, f"p{gib}.img")
        sh([CV, "mkfs", "--data", "single", "--metadata", "dup", "--size", f"{gib + 4}G", dev])
        commands.append(f"for i in $(seq 0 {gib - 1}); do {CV} volume create v$i --size 1G {dev}; "
                        f"{CV} volume import v$i {src} {dev}; done")
        for i in range(gib):
            sh([CV, "volume", "create", f"v{i}", "--size", "1G", dev], record=False)
            sh([CV, "volume", "import", f"v{i}", src, dev], record=False)
        times, rss, rchar = [], [], []
        for _ in range(max(REPS, 3)):
            drop_caches()
            t, r = timed(["/usr/bin/time", "-f", "%M", CV, "usage", "--json", dev],
                         env={**os.environ, "CHUNKVOL_REPORT_IO": "1"})
            times.append(t)
            lines = r.stderr.strip().splitlines()
            rss.append(int(lines[-1]) * 1024)
            io = [l for l in lines if l.startswith("chunkvol-io:")][0]
            rchar.append(int(io.split("rchar: ")[1].split()[0]))
        rows.append({"data_gib": gib, "open_s": median(times), "peak_rss_bytes": median(rss),
                     "bytes_read": median(rchar)})
        os.remove(dev)
    results["sections"]["open"] = rows


# ---- 2. scrub vs raw read vs kernel btrfs scrub ----------------------------
def bench_scrub():
    data = 512 * MIB if QUICK else 2 * GIB
    d = fresh("scrub")
    src = os.path.join(WORK, "rand-scrub.bin")
    random_file(src, data)
    a, b = os.path.join(d, "a.img"), os.path.join(d, "b.img")
    dev_size = f"{data // GIB + 2}G"
    sh([CV, "mkfs", "--data", "raid1", "--metadata", "raid1", "--size", dev_size, a, b])
    sh([CV, "volume", "create", "disk0", "--size", str(data), a, b])
    sh([CV, "volume", "import", "disk0", src, a, b])
    cv_t, raw_t, bt_t = [], [], []
    scrubbed = 0
    # Kernel btrfs on loop devices holding the same amount of data. The three
    # readers take turns within each round, so that the host's slow spells
    # fall on all of them alike.
    bd = fresh("btrfs")
    ba, bb, mnt = os.path.join(bd, "a.img"), os.path.join(bd, "b.img"), os.path.join(bd, "mnt")
    os.makedirs(mnt)
    sh(f"truncate -s {dev_size} {ba} {bb}")
    sh(["mkfs.btrfs", "-q", "-f", "-d", "raid1", "-m", "raid1", ba, bb])
    la = sh(["losetup", "-f", "--show", ba]).stdout.strip()
    lb = sh(["losetup", "-f", "--show", bb]).stdout.strip()
    try:
        sh(["btrfs", "device", "scan"], check=False)
        sh(["mount", la, mnt])
        sh(f"cp {src} {mnt}/data && sync")
        for _ in range(1 if QUICK else 5):
            drop_caches()
            t, r = timed([CV, "scrub", "start", "-B", "--json", a, b])
            scrubbed = json.loads(r.stdout)["bytes_scrubbed"]
            cv_t.append(t)
            drop_caches()
            # The raw peer reads the allocated parts of the same device files
            # (holes skipped with SEEK_DATA), both files at once.
            t = time.perf_counter()
            ths = [threading.Thread(target=read_allocated, args=(p,)) for p in (a, b)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            raw_t.append(time.perf_counter() - t)
            drop_caches()
            t, r = timed(["btrfs", "scrub", "start", "-B", mnt])
            bt_t.append(t)
        commands.append(f"dd if=DEV of=/dev/null bs=4M iflag=skip_bytes,count_bytes skip=A count=N  # per allocated range (SEEK_DATA/SEEK_HOLE) of {a} and {b}, both files at once")
    finally:
        sh(["umount", mnt], check=False)
        sh(["losetup", "-d", la], check=False)
        sh(["losetup", "-d", lb], check=False)
    raw_bytes = allocated_bytes(a) + allocated_bytes(b)
    cv_rate = scrubbed / median(cv_t)
    bt_rate = 2 * data / median(bt_t)
    results["sections"]["scrub"] = {
        "data_bytes": data, "chunkvol_s": median(cv_t), "chunkvol_bytes_scrubbed": scrubbed,
        "raw_read_s": median(raw_t), "btrfs_scrub_s": median(bt_t),
        "chunkvol_rate": cv_rate, "btrfs_rate": bt_rate,
        "ratio_vs_btrfs_time": median(bt_t) / median(cv_t),
        "ratio_vs_raw_time": median(raw_t) / median(cv_t),
        "raw_bytes_read": raw_bytes,
        "rounds_s": {"chunkvol": cv_t, "raw": raw_t, "btrfs": bt_t},
    }


# ---- 3. NBD I/O with fio vs qemu-nbd and nbdkit ----------------------------
NBD_ROUNDS = 1 if QUICK else 3
NBD_ROUND_SECS = 5


def bench_nbd():
    d = fresh("nbd")
    # (rw, bs, depth, extra fio args, label suffix): "fsync" is a database
    # in a VM, a flush after every 4 KiB write; "cold" reads run after the
    # page cache is dropped (the others read what the writes before them
    # left in it, which chunkvol's direct bulk writes do not).
    loads = [("write", "1M", 8, (), ""), ("read", "1M", 8, (), ""), ("randread", "4k", 32, (), ""),
             ("randwrite", "4k", 32, (), ""), ("randwrite", "4k", 1, ("--fsync=1",), " fsync"),
             ("read", "1M", 8, (), " cold"), ("randread", "4k", 32, (), " cold")]
    conns = [1] if QUICK else [1, 4]
    rows = {"_method": f"every server runs at once; each load runs on each server in turn, "
                       f"{NBD_ROUNDS} round(s) of {NBD_ROUND_SECS} s; the table shows each server's median round"}
    servers = []  # (name, uri, Serve)
    try:
        for prof in ["single", "raid1"]:
            devs = [os.path.join(d, f"{prof}{i}.img") for i in range(1 if prof == "single" else 2)]
            sh([CV, "mkfs", "--data", prof, "--size", "3G", *devs])
            sh([CV, "volume", "create", "disk0", "--size", "1G", *devs])
            port = free_port()
            s = Serve([CV, "serve", "--listen", f"127.0.0.1:{port}", "--socket", os.path.join(d, f"{prof}.sock"), *devs], port)
            servers.append((f"chunkvol {prof}", f"nbd://127.0.0.1:{port}/disk0", s))
        # Each peer has a fresh image of its own, as each chunkvol pool does.
        for fmt in ["raw", "qcow2"]:
            path = os.path.join(d, f"qemu.{fmt}")
            sh(["qemu-img", "create", "-q", "-f", fmt, path, "1G"])
            port = free_port()
            s = Serve(["qemu-nbd", "-p", str(port), "-b", "127.0.0.1", "-f", fmt, "-x", "disk0", "--cache=writeback", "-e", "8", "-t", path], port)
            servers.append((f"qemu-nbd {fmt}", f"nbd://127.0.0.1:{port}/disk0", s))
        raw = os.path.join(d, "nbdkit.img")
        sh(f"truncate -s 1G {raw}")
        port = free_port()
        s = Serve(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", raw], port)
        servers.append(("nbdkit file", f"nbd://127.0.0.1:{port}/", s))
        for rw, bs, depth, extra, suffix in loads:
            key = "bw_bytes" if bs == "1M" else "iops"
            for jobs in conns:
                per = {name: [] for name, _, _ in servers}
                for _ in range(NBD_ROUNDS):
                    for name, uri, _ in servers:
                        if suffix == " cold":
                            drop_caches()
                        per[name].append(fio(uri, rw, bs, depth, NBD_ROUND_SECS, jobs, extra))
                row = rows.setdefault(f"{rw} {bs} qd{depth}{suffix} x{jobs}", {})
                for name, rs in per.items():
                    med = sorted(rs, key=lambda r: r[key])[len(rs) // 2]
                    row[name] = {**med, "rounds": [r[key] for r in rs]}
    finally:
        for _, _, s in servers:
            s.stop()
    results["sections"]["nbd"] = rows


# ---- 3b. server memory under many connections -----------------------------
# The documented bound: 8 connections x the 64 MiB per-connection cap on
# in-flight payload bytes (nbd::ServerConfig::max_in_flight_bytes_per_conn).
RSS_BOUND_MIB = 512


def peak_rss_during(proc, work):
    """Run work() while sampling proc's VmRSS; the highest sample, bytes."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=sample)
    th.start()
    try:
        work()
    finally:
        done.set()
        th.join()
    return peak[0]


def bench_rss():
    secs = 5 if QUICK else 15
    d = fresh("rss")
    rows = {}
    devs = [os.path.join(d, "single0.img")]
    sh([CV, "mkfs", "--data", "single", "--size", "6G", *devs])
    sh([CV, "volume", "create", "disk0", "--size", "4G", *devs])
    raw = os.path.join(d, "raw.img")
    sh(f"truncate -s 4G {raw}")
    for name, argv in [("chunkvol single", lambda port: [CV, "serve", "--listen", f"127.0.0.1:{port}",
                                                          "--socket", os.path.join(d, "ctl.sock"), *devs]),
                       ("qemu-nbd raw", lambda port: ["qemu-nbd", "-p", str(port), "-b", "127.0.0.1", "-f", "raw",
                                                       "-x", "disk0", "--cache=writeback", "-e", "8", "-t", raw])]:
        port = free_port()
        s = Serve(argv(port), port)
        try:
            r = {}
            rss = peak_rss_during(s.p, lambda: r.update(
                fio(f"nbd://127.0.0.1:{port}/disk0", "write", "1M", 32, secs, 8)))
            rows[name] = {"peak_rss_bytes": rss, **r}
        finally:
            s.stop()
    results["sections"]["rss"] = {"load": "fio write 1M, 8 connections x qd32", "bound_mib": RSS_BOUND_MIB, **rows}


# ---- 4. foreground IOPS during a default scrub -----------------------------
def bench_fg_during_scrub():
    secs = 5 if QUICK else 15
    d = fresh("fg")
    devs = [os.path.join(d, "a.img"), os.path.join(d, "b.img")]
    src = os.path.join(WORK, "rand-1g.bin")
    random_file(src, GIB)
    sh([CV, "mkfs", "--size", "4G", *devs])
    sh([CV, "volume", "create", "disk0", "--size", "1G", *devs])
    sh([CV, "volume", "import", "disk0", src, *devs])
    port = free_port()
    sock = os.path.join(d, "ctl.sock")
    s = Serve([CV, "serve", "--listen", f"127.0.0.1:{port}", "--socket", sock, *devs], port)
    uri = f"nbd://127.0.0.1:{port}/disk0"
    try:
        base = fio(uri, "randread", "4k", 32, secs)["iops"]
        stop = time.time() + secs + 2
        scrubs = subprocess.Popen(["bash", "-c", f"while [ $(date +%s) -lt {int(stop)} ]; do {CV} scrub start -B --socket {sock} >/dev/null; done"])
        time.sleep(0.5)
        during = fio(uri, "randread", "4k", 32, secs)["iops"]
        scrubs.wait()
    finally:
        s.stop()
    results["sections"]["fg_during_scrub"] = {"iops_without": base, "iops_during": during, "ratio": during / base}


# ---- 5. reclaim: trim a full block group until it is deleted ----------------
def bench_reclaim():
    d = fresh("reclaim")
    devs = [os.path.join(d, "a.img"), os.path.join(d, "b.img")]
    sh([CV, "mkfs", "--size", "2G", *devs])
    sh([CV, "volume", "create", "disk0", "--size", "1G", *devs])
    port = free_port()
    sock = os.path.join(d, "ctl.sock")
    s = Serve([CV, "serve", "--listen", f"127.0.0.1:{port}", "--socket", sock, "--commit-interval", "1", *devs], port)
    uri = f"nbd://127.0.0.1:{port}/disk0"
    try:
        sh(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 900M"])
        n0 = len([b for b in json.loads(sh([CV, "usage", "--json", "--socket", sock]).stdout)["block_groups"] if b["type"] == "data"])
        t = time.perf_counter()
        sh(["qemu-io", "-f", "raw", uri, "-c", "discard 0 1G"])
        while True:
            bgs = [b for b in json.loads(sh([CV, "usage", "--json", "--socket", sock]).stdout)["block_groups"] if b["type"] == "data"]
            if len(bgs) <= 1:
                break
            if time.perf_counter() - t > 120:
                raise RuntimeError("groups not reclaimed")
            time.sleep(0.05)
        results["sections"]["reclaim"] = {"data_groups_before": n0, "seconds_to_delete": time.perf_counter() - t,
                                          "commit_interval_s": 1}
    finally:
        s.stop()


# ---- 6. Relocation (balance) vs cp of the same bytes ----------------------
def bench_reloc():
    data = 512 * MIB if QUICK else 2 * GIB
    d = fresh("reloc")
    src = os.path.join(WORK, "rand-reloc.bin")
    random_file(src, data)
    a, b = os.path.join(d, "a.img"), os.path.join(d, "b.img")
    dev_size = f"{2 * data // GIB + 2}G"
    sh([CV, "mkfs", "--data", "raid1", "--metadata", "raid1", "--size", dev_size, a, b])
    sh([CV, "volume", "create", "disk0", "--size", str(data), a, b])
    sh([CV, "volume", "import", "disk0", src, a, b])
    cv_t, cp_t, moved = [], [], 0
    for _ in range(REPS):
        drop_caches()
        t, r = timed([CV, "balance", "start", "-d", "--json", a, b])
        moved = json.loads(r.stdout)["bytes_relocated"]
        cv_t.append(t)
        # The peer copies the same logical bytes twice (raid1 writes both
        # copies), reading a file and writing it back, with an fsync.
        dst = os.path.join(d, "cp.out")
        drop_caches()
        t = time.perf_counter()
        for i in range(2):
            sh(f"cp {src} {dst}.{i}")
        sh(f"sync {dst}.0 {dst}.1")
        cp_t.append(time.perf_counter() - t)
        sh(f"rm -f {dst}.0 {dst}.1")
    results["sections"]["reloc"] = {
        "data_bytes": data, "bytes_relocated": moved, "balance_s": median(cv_t),
        "cp_s": median(cp_t), "ratio_vs_cp_time": median(cp_t) / median(cv_t),
    }


# ---- 7. checksums: the engine's paths vs the raw crates ---------------------
def bench_csum():
    secs = "0.3" if QUICK else "1.5"
    r = sh([CV, "bench-csum", "--json", "--seconds", secs])
    results["sections"]["csum"] = {"rows": json.loads(r.stdout), "buffer_bytes": 1 << 20}


def fmt_rate(b):
    return f"{b / MIB:.0f} MiB/s"


def targets(S):
    """The issue's targets against this table, met or not, stated plainly."""
    rows = []

    def row(what, value, goal, ok):
        rows.append(f"| {what} | {value} | {goal} | {'met' if ok else '**not met**'} |")

    if "scrub" in S:
        r = S["scrub"]
        row("scrub vs kernel btrfs scrub (time ratio)", f"{r['ratio_vs_btrfs_time']:.2f}", ">= 1.0", r["ratio_vs_btrfs_time"] >= 1.0)
        row("scrub vs raw read of the device files", f"{r['ratio_vs_raw_time']:.2f}", ">= 0.9", r["ratio_vs_raw_time"] >= 0.9)
    nbd = S.get("nbd", {})
    for load, peer, goal in [("write 1M qd8", "qemu-nbd raw", 0.8), ("read 1M qd8", "qemu-nbd raw", 0.8),
                             ("randread 4k qd32", "qemu-nbd qcow2", 1.0), ("randwrite 4k qd32", "qemu-nbd qcow2", 1.0),
                             ("randwrite 4k qd1 fsync", "qemu-nbd qcow2", 1.0)]:
        for key, row_ in nbd.items():
            if key.startswith(load) and "chunkvol single" in row_ and peer in row_:
                m = "bw_bytes" if "1M" in load else "iops"
                v = row_["chunkvol single"][m] / row_[peer][m]
                row(f"NBD {key}, chunkvol single / {peer}", f"{v:.2f}", f">= {goal}", v >= goal)
    if "rss" in S and "chunkvol single" in S["rss"]:
        v = S["rss"]["chunkvol single"]["peak_rss_bytes"] / MIB
        row("serve peak RSS, 8 connections x qd32 x 1 MiB writes (MiB)", f"{v:.0f}",
            f"<= {S['rss']['bound_mib']}", v <= S["rss"]["bound_mib"])
    if "fg_during_scrub" in S:
        v = S["fg_during_scrub"]["ratio"]
        row("4 KiB random read IOPS during a default scrub / without", f"{v:.2f}", ">= 0.7", v >= 0.7)
    if "open" in S:
        o = S["open"]["rows"] if isinstance(S["open"], dict) else S["open"]
        if len(o) >= 2:
            a, b = o[0], o[-1]
            grow = (b["peak_rss_bytes"] / a["peak_rss_bytes"]) / (b["data_gib"] / a["data_gib"])
            row(f"open: peak RSS growth per data growth, {a['data_gib']} -> {b['data_gib']} GiB",
                f"{grow:.2f}", "well below 1 (grows with metadata, not data)", grow < 0.5)
    if not rows:
        return []
    return ["## Targets (issue: benchmarks and speed)", "",
            "| target | this table | goal | |", "|---|---|---|---|"] + rows + [""]


def targets_writes(S):
    """Issue 15's goals (writes at the speed of the fastest peer) that the
    NBD table measures: ratios within one run, met or not."""
    rows = []
    for key, r in S.get("nbd", {}).items():
        if key.startswith("_"):
            continue
        m = "bw_bytes" if " 1M " in f" {key} " else "iops"

        def ratio(a, b):
            return r[a][m] / r[b][m] if a in r and b in r and r[b][m] else None

        goals = []
        if key.startswith("write 1M"):
            goals = [("chunkvol single", "nbdkit file", 0.6), ("chunkvol single", "qemu-nbd qcow2", 1.0),
                     ("chunkvol raid1", "chunkvol single", 0.7)]
        elif key.startswith("randwrite 4k qd32"):
            goals = [("chunkvol single", "nbdkit file", 0.9), ("chunkvol raid1", "chunkvol single", 0.8)]
        elif key.startswith("randwrite 4k qd1 fsync"):
            goals = [("chunkvol single", "qemu-nbd qcow2", 1.0)]
        elif key.startswith(("read 1M", "randread 4k")):
            goals = [("chunkvol single", "nbdkit file", 1.0)]
            if key.endswith("x4"):
                goals.append(("chunkvol raid1", "chunkvol single", 1.3))
        for a, b, goal in goals:
            v = ratio(a, b)
            if v is not None:
                ok = "met" if v >= goal else "**not met**"
                rows.append(f"| {key}: {a} / {b} | {v:.2f} | >= {goal} | {ok} |")
    if not rows:
        return []
    return ["## Targets (issue 15: writes at the speed of the fastest peer)", "",
            "From the NBD table below (one run). Reads follow the writes without dropping the cache, "
            "so a peer whose writes went through the host page cache reads from it; the \"cold\" rows "
            "drop the cache first.", "",
            "| target | this table | goal | |", "|---|---|---|---|"] + rows + [""]


def report():
    S = results["sections"]
    out = ["# Benchmarks", "",
           f"Regenerated by `bench/run{' --quick' if QUICK else ''}` (sections may come from separate runs, each named below) on {results['date']} "
           f"({results['machine']}; backing storage: files under {WORK}). "
           "Ratios compare against a peer measured in the same run; absolute numbers are noisy.", "",
           "How to run: `bench/run` (everything, about 16 minutes on 2 cores; it installs fio, nbdkit, "
           "qemu-utils and btrfs-progs if missing and builds release), `bench/run --quick` (a few minutes; "
           "writes docs/BENCHMARKS-quick.md), `bench/run SECTION...` (open scrub nbd fg reclaim reloc csum rss; "
           "the other sections keep their last figures), `bench/run report` (re-render after editing "
           "bench/profile.md). Raw figures: bench/results.json.", ""]
    def ran(sec):
        r = sec.get("_run") if isinstance(sec, dict) else None
        return [f"Measured {r['date']} by `{r['command']}`.", ""] if r else []

    out += targets(S)
    out += targets_writes(S)
    if "open" in S:
        rows = S["open"]["rows"] if isinstance(S["open"], dict) else S["open"]
        out += ["## Open time and memory (issue: pool foundation, acceptance 8)", ""] + ran(S["open"]) + [
                "`chunkvol usage --json DEV` after dropping the page cache; `bytes read` is the process's rchar.", "",
                "| data | open (s) | peak RSS | bytes read |", "|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['data_gib']} GiB | {r['open_s']:.3f} | {r['peak_rss_bytes'] / MIB:.1f} MiB | {r['bytes_read'] / MIB:.2f} MiB |")
        out.append("")
    if "scrub" in S:
        r = S["scrub"]
        out += ["## Scrub throughput (raid1)", ""] + ran(r) + [
                f"{r['data_bytes'] / MIB:.0f} MiB of data in raid1 (both copies verified), page cache dropped before each run.", "",
                "| what | time (s) | rate | ratio (peer time / chunkvol time) |", "|---|---|---|---|",
                f"| chunkvol scrub | {r['chunkvol_s']:.2f} | {fmt_rate(r['chunkvol_rate'])} | 1.00 |",
                f"| raw read of the allocated parts of both device files | {r['raw_read_s']:.2f} | {fmt_rate(r['raw_bytes_read'] / r['raw_read_s'])} | {r['ratio_vs_raw_time']:.2f} |",
                f"| kernel btrfs scrub (loop devices) | {r['btrfs_scrub_s']:.2f} | {fmt_rate(r['btrfs_rate'])} | {r['ratio_vs_btrfs_time']:.2f} |", ""]
        if "rounds_s" in r:
            out += ["Times are medians; the three take turns within each round. Each round, in seconds: " + "; ".join(
                f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in r["rounds_s"].items()) + ".", ""]
    if "nbd" in S:
        out += ["## NBD I/O (fio, nbd engine)", ""] + ran(S["nbd"])
        if "_method" in S["nbd"]:
            out += [S["nbd"]["_method"][0].upper() + S["nbd"]["_method"][1:] + ".", ""]
        names = sorted({n for k, row in S["nbd"].items() if not k.startswith("_") for n in row})
        out += ["| load | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for load, row in S["nbd"].items():
            if load.startswith("_"):
                continue
            cells = []
            for n in names:
                v = row.get(n)
                cells.append("" if v is None else (f"{v['bw_bytes'] / MIB:.0f} MiB/s" if "1M" in load else f"{v['iops']:.0f} IOPS"))
            out.append(f"| {load} | " + " | ".join(cells) + " |")
        out.append("")
        for load, row in S["nbd"].items():
            if load.startswith("_"):
                continue
            c, q = row.get("chunkvol single"), row.get("qemu-nbd raw")
            if c and q:
                key = "bw_bytes" if "1M" in load else "iops"
                out.append(f"- {load}: chunkvol single / qemu-nbd raw = {c[key] / q[key]:.2f}; "
                           f"vs qemu-nbd qcow2 = {c[key] / row['qemu-nbd qcow2'][key]:.2f}")
        out.append("")
    if "rss" in S:
        r = S["rss"]
        out += ["## Server memory under load", ""] + ran(r) + [
                f"Peak resident memory (VmRSS sampled every 0.1 s) while fio writes 1 MiB blocks over 8 connections "
                f"at queue depth 32 each (256 MiB of requests). The bound for chunkvol is {r['bound_mib']} MiB: 8 connections "
                f"times the 64 MiB each may hold in flight (`max_in_flight_bytes_per_conn`); qemu-nbd holds far less.", "",
                "| server | peak RSS | write rate |", "|---|---|---|"]
        for n in ("chunkvol single", "qemu-nbd raw"):
            if n in r:
                out.append(f"| {n} | {r[n]['peak_rss_bytes'] / MIB:.0f} MiB | {r[n]['bw_bytes'] / MIB:.0f} MiB/s |")
        out.append("")
    if "fg_during_scrub" in S:
        r = S["fg_during_scrub"]
        out += ["## Foreground I/O during scrub", ""] + ran(r) + [
                f"4 KiB random read, qd32: {r['iops_without']:.0f} IOPS without scrub, {r['iops_during']:.0f} during a default scrub loop: ratio **{r['ratio']:.2f}**.", ""]
    if "reclaim" in S:
        r = S["reclaim"]
        out += ["## Reclaim", ""] + ran(r) + [
                f"Trim of a volume holding {r['data_groups_before']} data block groups to their deletion by the cleaner: {r['seconds_to_delete']:.2f} s (commit interval {r['commit_interval_s']} s).", ""]
    if "reloc" in S:
        r = S["reloc"]
        out += ["## Relocation (balance)", ""] + ran(r) + [
                f"`balance start -d` of {r['data_bytes'] / MIB:.0f} MiB in raid1 (every data extent read, verified and written to both copies) "
                f"vs `cp` of the same file twice plus sync (the same bytes read once and written twice), page cache dropped first.", "",
                "| what | time (s) | rate | ratio (cp time / balance time) |", "|---|---|---|---|",
                f"| chunkvol balance | {r['balance_s']:.2f} | {fmt_rate(r['bytes_relocated'] / r['balance_s'])} | {r['ratio_vs_cp_time']:.2f} |",
                f"| cp x2 + sync | {r['cp_s']:.2f} | {fmt_rate(r['data_bytes'] / r['cp_s'])} | 1.00 |", ""]
    if "csum" in S:
        r = S["csum"]
        out += ["## Checksums: engine vs crate", ""] + ran(r) + [
                "`chunkvol bench-csum`: one core, 1 MiB of data. The crate hashing the whole buffer per call, the crate "
                "called once per 4 KiB sector, the engine's write path (one sum per sector appended) and its read and "
                "scrub path (every sector checked against stored sums). Ratio: engine / crate per sector.", "",
                "| algorithm | crate, 1 MiB calls | crate, 4 KiB calls | engine compute | engine verify | ratio compute | ratio verify |",
                "|---|---|---|---|---|---|---|"]
        g = lambda b: f"{b / 1e9:.2f} GB/s"
        for x in r["rows"]:
            base = x["crate_sector_bytes_per_s"]
            out.append(f"| {x['algorithm']} | {g(x['crate_buffer_bytes_per_s'])} | {g(base)} | "
                       f"{g(x['engine_compute_bytes_per_s'])} | {g(x['engine_verify_bytes_per_s'])} | "
                       f"{x['engine_compute_bytes_per_s'] / base:.2f} | {x['engine_verify_bytes_per_s'] / base:.2f} |")
        out.append("")
    # What the profiles showed is written by hand (bench/profile.md); the
    # table above is regenerated.
    notes = os.path.join(ROOT, "bench/profile.md")
    if os.path.exists(notes):
        out += open(notes).read().rstrip().splitlines() + [""]
    out += ["## Commands", "", "The commands of the last run (sections it did not run keep their figures "
            "from the run named above them).", "", "```"] + commands[:200] + ["```", ""]
    path = os.path.join(ROOT, "docs/BENCHMARKS.md" if not QUICK else "docs/BENCHMARKS-quick.md")
    with open(path, "w") as f:
        f.write("\n".join(out))
    results["commands"] = commands
    with open(os.path.join(ROOT, "bench/results.json" if not QUICK else "bench/results-quick.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(out[:60]))


os.makedirs(WORK, exist_ok=True)
_prev = os.path.join(ROOT, "bench/results.json" if not QUICK else "bench/results-quick.json")
prev = {}
if os.path.exists(_prev):
    # A run of some sections keeps the others' last figures.
    try:
        prev = json.load(open(_prev))
    except (OSError, ValueError):
        prev = {}
    results["sections"].update(prev.get("sections", {}))
only = [a for a in sys.argv[1:] if not a.startswith("--")]
if only == ["report"]:
    # Re-render docs/BENCHMARKS.md (after editing bench/profile.md) from the
    # last run's figures and commands, measuring nothing.
    for k in ("date", "machine", "commands"):
        if k in prev:
            results[k] = prev[k]
    commands[:] = results.get("commands", [])
for name, fn in [("open", bench_open), ("scrub", bench_scrub), ("nbd", bench_nbd),
                 ("fg", bench_fg_during_scrub), ("reclaim", bench_reclaim), ("reloc", bench_reloc),
                 ("csum", bench_csum), ("rss", bench_rss)]:
    if only and name not in only:
        continue
    print(f"== {name}", flush=True)
    fn()
    key = {"fg": "fg_during_scrub"}.get(name, name)
    sec = results["sections"].get(key)
    ran = " ".join(["bench/run" if a == sys.argv[0] else a for a in sys.argv])
    env = f"BENCH_OPEN_SIZES={os.environ['BENCH_OPEN_SIZES']} " if "BENCH_OPEN_SIZES" in os.environ and name == "open" else ""
    meta = {"command": env + ran, "date": time.strftime("%Y-%m-%d %H:%M")}
    if isinstance(sec, dict):
        sec["_run"] = meta
    elif isinstance(sec, list):
        results["sections"][key] = {"rows": sec, "_run": meta}
report()
