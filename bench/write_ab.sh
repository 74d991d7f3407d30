#!/usr/bin/env bash
# Writes, A/B (issue 15, goals 1 and 2): for each round and each binary,
# chunkvol single and raid1 on a fresh 3G pool (sparse files under
# /var/tmp, a 1 GiB volume), then nbdkit's file plugin on a fresh sparse
# 1 GiB file, the peer of the same round. Each target gets the loads in
# LOADS (default: write 1M qd8, read 1M qd8, randwrite 4k qd32; fio nbd
# engine, one connection, 5 s each, over the first 512 MiB, page cache
# dropped before the first load) and prints one line per load.
# Usage: [LOADS="rw:bs:qd ..."] [SECS=5] bench/write_ab.sh ROUNDS BINARY...
# Needs: fio, nbdkit, root (drop_caches).
set -euo pipefail
rounds=$1; shift
loads=${LOADS:-write:1M:8 read:1M:8 randwrite:4k:32}
secs=${SECS:-5}
work=$(mktemp -d /var/tmp/chunkvol-writeab.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
run_loads() { # NAME URI
  sync; echo 3 > /proc/sys/vm/drop_caches
  for l in $loads; do
    IFS=: read -r rw bs qd <<<"$l"
    fio --name=w --ioengine=nbd --uri="$2" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=512M \
        --time_based --runtime="$secs" --output-format=json 2>/dev/null |
      python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.find("{"):])["jobs"][0]; side="read" if "read" in sys.argv[2] else "write"; print("%s | %s | %.0f IOPS | %.0f MiB/s" % (sys.argv[1], sys.argv[2], j[side]["iops"], j[side]["bw_bytes"]/2**20))' "$1" "$rw $bs qd$qd"
  done
}
stop() { kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null || true; srv=""; rm -f "$work"/*; }
for r in $(seq "$rounds"); do
  for bin in "$@"; do
    for prof in single raid1; do
      devs=("$work/a.img"); [ "$prof" = raid1 ] && devs+=("$work/b.img")
      "$bin" mkfs --data "$prof" --size 3G "${devs[@]}" >/dev/null
      "$bin" volume create disk0 --size 1G "${devs[@]}" >/dev/null
      "$bin" serve --listen "unix:$work/nbd.sock" --socket "$work/ctl.sock" "${devs[@]}" >"$work/serve.log" 2>&1 &
      srv=$!
      for _ in $(seq 100); do [ -S "$work/ctl.sock" ] && break; sleep 0.1; done
      run_loads "round $r $bin $prof" "nbd+unix:///disk0?socket=$work/nbd.sock"
      stop
    done
  done
  truncate -s 1G "$work/raw.img"
  nbdkit -f -U "$work/nbd.sock" file "$work/raw.img" &
  srv=$!
  for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
  run_loads "round $r nbdkit file" "nbd+unix:///?socket=$work/nbd.sock"
  stop
done
