#!/usr/bin/env bash
# IOPS as the mapping tree grows, interleaved (issue 15, goal 6). Two pools
# (single data, dup metadata, sparse files under /var/tmp), one volume each
# of SIZE_A and SIZE_B, both fully mapped by nbdcopy from nbdkit random and
# flushed, both served at once. Then ROUNDS rounds; each runs, on each
# volume in turn (the order alternates by round), 4 KiB random reads (page
# cache dropped first) and 4 KiB random writes, fio nbd engine, qd32, SECS
# seconds each, and prints one line per load; between them, the peer: fio
# random reads straight from the pool's device file over its first SIZE
# bytes (page cache dropped), four threads of buffered preads as the
# server's four workers per connection do (buffered libaio would run at
# depth one): the host storage's own cost at that size. Every round's writes fragment the volumes further, as a client's
# would.
# Usage: [SECS=10] bench/mapped_ab.sh SIZE_A SIZE_B ROUNDS
# Needs: nbdkit, nbdcopy, fio, root (drop_caches); CHUNKVOL=binary (default
# target/release/chunkvol). Disk: about 1.3x SIZE_A + SIZE_B, + 4 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CHUNKVOL:-target/release/chunkvol}
secs=${SECS:-10}
sizes=("$1" "$2")
rounds=$3
work=$(mktemp -d /var/tmp/chunkvol-mappedab.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"' EXIT
iops() { # URI RW
  fio --name=m --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 --size=100% \
      --time_based --runtime="$secs" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.find("{"):])["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]))'
}
uri() { echo "nbd+unix:///v?socket=$work/$1/nbd.sock"; }
for i in 0 1; do
  size=${sizes[$i]}
  b=$(numfmt --from=iec "$size")
  d="$work/$i"
  mkdir "$d"
  "$bin" mkfs --data single --metadata dup --size $((b + b / 4 + (2 << 30))) "$d/dev.img" >/dev/null
  "$bin" serve --listen "unix:$d/nbd.sock" --socket "$d/ctl.sock" "$d/dev.img" >"$d/serve.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$d/ctl.sock" ] && break; sleep 0.1; done
  "$bin" volume create v --size "$size" --socket "$d/ctl.sock" >/dev/null
  nbdcopy --flush -- [ nbdkit random size="$size" ] "$(uri "$i")"
done
# The host storage's own random reads over the same bytes, cache dropped.
peer() { # DEVICE SIZE
  fio --name=p --filename="$1" --ioengine=psync --numjobs=4 --group_reporting --rw=randread \
      --bs=4k --size="$2" --time_based --runtime="$secs" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(round(json.loads(s[s.find("{"):])["jobs"][0]["read"]["iops"]))'
}
echo "| round | mapped | randread 4k qd32 IOPS | device file randread (peer) | randwrite 4k qd32 IOPS |"
echo "|---|---|---|---|---|"
for r in $(seq "$rounds"); do
  order=(0 1); [ $((r % 2)) -eq 0 ] && order=(1 0)
  for i in "${order[@]}"; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    rd=$(iops "$(uri "$i")" randread)
    sync; echo 3 > /proc/sys/vm/drop_caches
    pr=$(peer "$work/$i/dev.img" "${sizes[$i]}")
    wr=$(iops "$(uri "$i")" randwrite)
    echo "| $r | ${sizes[$i]} | $rd | $pr | $wr |"
  done
done
