#!/usr/bin/env bash
# CPU and system calls per request (issue 15, goal 2): steadier on a noisy
# machine than IOPS. For each round and each binary: a fresh single pool
# (sparse file under /var/tmp, a 1 GiB volume), fio's nbd engine over a
# Unix socket running LOAD (default randwrite 4 KiB qd32) for SECS seconds
# (default 8) over the first 512 MiB, and perf stat counting the server's
# system calls. Prints one line per run: IOPS, the server's CPU time per
# request, and its send (sendto, plus sendmsg: several replies in one
# call), receive and futex calls and context switches per request. The
# name `nbdkit` in place of a binary runs the peer: nbdkit's file plugin
# on a fresh sparse 1 GiB file.
# With PREFILL=1 the first 512 MiB are written (1 MiB blocks) before the
# measured load, so that reads find data.
# Usage: [LOAD=rw:bs:qd] [SECS=8] [PREFILL=1] bench/cpu_per_io.sh ROUNDS BINARY|nbdkit...
# Needs: fio, perf, nbdkit.
set -euo pipefail
. "$(dirname "$0")/serve_single.sh"
rounds=$1; shift
IFS=: read -r rw bs qd <<<"${LOAD:-randwrite:4k:32}"
secs=${SECS:-8}
work=$(mktemp -d /var/tmp/chunkvol-cpuio.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
echo "| round | binary | IOPS | server CPU µs per request | sendto | sendmsg | recvfrom | futex | context switches (per request) |"
echo "|---|---|---|---|---|---|---|---|---|"
for r in $(seq "$rounds"); do
  for bin in "$@"; do
    if [ "$bin" = nbdkit ]; then
      truncate -s 1G "$work/a.img"
      nbdkit -f -U "$work/nbd.sock" -e disk0 file "$work/a.img" &
      srv=$!
      for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
    else
      serve_single "$bin" "$work"
    fi
    uri="nbd+unix:///disk0?socket=$work/nbd.sock"
    if [ -n "${PREFILL:-}" ]; then
      fio --name=f --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=512M >/dev/null 2>&1
    fi
    perf stat -x, -e syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_recvfrom,syscalls:sys_enter_futex,context-switches \
      -p "$srv" -o "$work/stat.csv" &
    st=$!
    cpu0=$(awk '{print $14 + $15}' "/proc/$srv/stat")
    fio --name=c --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --size=512M --time_based --runtime="$secs" --output-format=json >"$work/fio.json" 2>/dev/null
    cpu1=$(awk '{print $14 + $15}' "/proc/$srv/stat")
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
    python3 - "$work/fio.json" "$work/stat.csv" "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" "$r" "$bin" <<'PY'
import json, sys
s = open(sys.argv[1]).read()
j = json.loads(s[s.find("{"):])["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
iops = j["read"]["iops"] + j["write"]["iops"]
c = {}
for line in open(sys.argv[2]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        c[f[2].split(":")[-1]] = float(f[0])
us = int(sys.argv[3]) / int(sys.argv[4]) * 1e6 / ios
per = lambda k: "%.2f" % (c.get(k, 0) / ios)
print(f"| {sys.argv[5]} | {sys.argv[6]} | {iops:.0f} | {us:.1f} | {per('sys_enter_sendto')} | {per('sys_enter_sendmsg')} | "
      f"{per('sys_enter_recvfrom')} | {per('sys_enter_futex')} | {per('context-switches')} |")
PY
    rm -f "$work"/*
  done
done
