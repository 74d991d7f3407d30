#!/bin/bash
# Usage: build two release binaries, one as it is (/tmp/cv-par) and one with
# PARALLEL_COPY_MIN_BYTES = usize::MAX in src/engine/fs_info.rs (/tmp/cv-ser),
# then run this from an empty directory on the disk under test (root: it drops caches).
# A/B: parallel vs serial copy writes, raid1, fio nbd engine.
set -e
for round in 1 2 3 4; do
for bin in /tmp/cv-par /tmp/cv-ser; do
  rm -f a.img b.img ctl.sock
  $bin mkfs --data raid1 --metadata raid1 --size 3G a.img b.img >/dev/null
  $bin volume create disk0 --size 1G a.img b.img >/dev/null
  $bin serve --listen 127.0.0.1:10888 --socket /var/tmp/ab/ctl.sock a.img b.img > serve.log 2>&1 &
  pid=$!; sleep 1; sync; echo 3 > /proc/sys/vm/drop_caches
  for qd in 1 8; do
    r=$(fio --name=b --ioengine=nbd --uri=nbd://127.0.0.1:10888/disk0 --rw=write --bs=1M --iodepth=$qd --size=512M --time_based --runtime=5 --output-format=json 2>/dev/null | python3 -c "import json,sys; d=sys.stdin.read(); j=json.loads(d[d.find('{'):]); print(int(j['jobs'][0]['write']['bw_bytes']/1048576))")
    echo "round $round $(basename $bin) write 1M qd$qd: $r MiB/s"
  done
  kill -INT $pid; wait $pid || true
done
done
