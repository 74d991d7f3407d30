#!/usr/bin/env bash
# Reads over mirrors (issue 15, goal 4): 1 MiB and 4 KiB random reads with
# 4 connections, chunkvol raid1 vs single, for one or more binaries (A/B:
# the copy-0 policy before vs the in-flight policy after). Each run: a fresh
# pool on sparse files under /var/tmp, a 1 GiB volume filled with random
# data (nbdcopy from nbdkit random), page cache dropped, then fio (nbd
# engine, 4 jobs, 10 s) prints MiB/s and IOPS.
# Usage: bench/read_mirrors.sh BINARY...   Needs: nbdkit, nbdcopy, fio, root.
set -euo pipefail
work=$(mktemp -d /var/tmp/chunkvol-readbench.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$work"' EXIT
fio_run() { # URI RW BS DEPTH -> MiB/s
  fio --name=r --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --numjobs=4 \
      --group_reporting --size=1G --time_based --runtime=10 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); r=json.loads(s[s.find("{"):])["jobs"][0]["read"]; print("%.0f MiB/s %.0f IOPS" % (r["bw"] / 1024, r["iops"]))'
}
printf '| binary | profile | read 1M qd8 x4 | randread 4k qd32 x4 |\n|---|---|---|---|\n'
for bin in "$@"; do
  for prof in single raid1; do
    devs=("$work/a.img"); [ "$prof" = raid1 ] && devs+=("$work/b.img")
    "$bin" mkfs --data "$prof" --metadata "$prof" --size 3G "${devs[@]}" >/dev/null
    "$bin" serve --listen "unix:$work/nbd.sock" --socket "$work/ctl.sock" "${devs[@]}" >"$work/serve.log" 2>&1 &
    srv=$!
    for _ in $(seq 100); do [ -S "$work/ctl.sock" ] && break; sleep 0.1; done
    "$bin" volume create v --size 1G --socket "$work/ctl.sock" >/dev/null
    uri="nbd+unix:///v?socket=$work/nbd.sock"
    nbdcopy --flush -- [ nbdkit random size=1G ] "$uri"
    sync; echo 3 > /proc/sys/vm/drop_caches
    seq_r=$(fio_run "$uri" read 1M 8)
    sync; echo 3 > /proc/sys/vm/drop_caches
    rand_r=$(fio_run "$uri" randread 4k 32)
    printf '| %s | %s | %s | %s |\n' "$bin" "$prof" "$seq_r" "$rand_r"
    kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
    rm -f "$work"/*.img "$work"/*.sock
  done
done
