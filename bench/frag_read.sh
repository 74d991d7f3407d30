#!/usr/bin/env bash
# Reads of a range that random overwrites fragmented (issue 15, goal 4):
# A/B of binaries. For each round and each binary: a fresh single pool
# (sparse file under /var/tmp, a 1 GiB volume), the first 512 MiB written
# in 1 MiB blocks, then fio randwrite 4 KiB qd32 over them for WRITE_SECS
# (default 10), then sequential 1 MiB reads qd8 for SECS (default 5):
# once with the host page cache as the writes left it ("hot"), once after
# dropping it ("cold"). fio nbd engine over a Unix socket. Prints MiB/s.
# Usage: [WRITE_SECS=10] [SECS=5] bench/frag_read.sh ROUNDS BINARY...
# Needs: fio, root (to drop the page cache).
set -euo pipefail
. "$(dirname "$0")/serve_single.sh"
rounds=$1; shift
wsecs=${WRITE_SECS:-10}
secs=${SECS:-5}
work=$(mktemp -d /var/tmp/chunkvol-frag.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mibs() {
  python3 -c 'import json,sys; s=open(sys.argv[1]).read(); j=json.loads(s[s.find("{"):])["jobs"][0]; print("%.0f" % ((j["read"]["bw_bytes"]+j["write"]["bw_bytes"])/2**20))' "$1"
}
echo "| round | binary | randwrite 4k qd32 (MiB/s) | read 1M qd8 hot (MiB/s) | read 1M qd8 cold (MiB/s) |"
echo "|---|---|---|---|---|"
for r in $(seq "$rounds"); do
  for bin in "$@"; do
    serve_single "$bin" "$work"
    uri="nbd+unix:///disk0?socket=$work/nbd.sock"
    f() { fio --name=f --ioengine=nbd --uri="$uri" --size=512M --output-format=json "$@" >"$work/fio.json" 2>/dev/null; }
    f --rw=write --bs=1M --iodepth=8
    f --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$wsecs"
    w=$(mibs "$work/fio.json")
    f --rw=read --bs=1M --iodepth=8 --time_based --runtime="$secs"
    hot=$(mibs "$work/fio.json")
    sync; echo 3 > /proc/sys/vm/drop_caches
    f --rw=read --bs=1M --iodepth=8 --time_based --runtime="$secs"
    cold=$(mibs "$work/fio.json")
    kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
    echo "| $r | $bin | $w | $hot | $cold |"
    rm -f "$work"/*
  done
done
