#!/usr/bin/env bash
# IOPS as the mapping tree grows (issue 15, goal 6): 4 KiB random reads and
# writes (fio nbd engine, qd32, 10 s each) on a volume with SIZE fully
# mapped (filled with random data through nbdcopy, then flushed), on a
# single-profile pool on a sparse file under /var/tmp. Reads run first, with
# the page cache dropped before them. The peer: the same random reads with
# fio's libaio engine straight from the device file, over its first SIZE
# bytes, after chunkvol stopped and the cache was dropped again (the host
# storage's own cost at that size).
# Usage: bench/mapped_iops.sh [SIZE...] (default 1G 32G)   Needs: nbdkit,
# nbdcopy, fio, root (drop_caches); CHUNKVOL=binary (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CHUNKVOL:-target/release/chunkvol}
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1G 32G)
work=$(mktemp -d /var/tmp/chunkvol-mapped.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$work"' EXIT
iops() { # URI RW
  fio --name=m --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 --size=100% \
      --time_based --runtime=10 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.find("{"):])["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]))'
}
printf '| mapped | randread 4k qd32 IOPS | device file randread (peer) | randwrite 4k qd32 IOPS |\n|---|---|---|---|\n'
for size in "${sizes[@]}"; do
  b=$(numfmt --from=iec "$size")
  dev="$work/dev.img"
  "$bin" mkfs --data single --metadata dup --size $((b + b / 4 + (2 << 30))) "$dev" >/dev/null
  "$bin" serve --listen "unix:$work/nbd.sock" --socket "$work/ctl.sock" "$dev" >"$work/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 100); do [ -S "$work/ctl.sock" ] && break; sleep 0.1; done
  "$bin" volume create v --size "$size" --socket "$work/ctl.sock" >/dev/null
  uri="nbd+unix:///v?socket=$work/nbd.sock"
  nbdcopy --flush -- [ nbdkit random size="$size" ] "$uri"
  sync; echo 3 > /proc/sys/vm/drop_caches
  r=$(iops "$uri" randread)
  w=$(iops "$uri" randwrite)
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
  sync; echo 3 > /proc/sys/vm/drop_caches
  peer=$(fio --name=p --filename="$dev" --ioengine=libaio --rw=randread --bs=4k --iodepth=32 \
      --size="$size" --time_based --runtime=10 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(round(json.loads(s[s.find("{"):])["jobs"][0]["read"]["iops"]))')
  printf '| %s | %s | %s | %s |\n' "$size" "$r" "$peer" "$w"
  rm -f "$dev" "$work"/*.sock
done
