#!/usr/bin/env bash
# A/B of offline scrub between chunkvol binaries (issue 15, goal 5): a raid1
# pool on two 2 GiB sparse files holding a 1 GiB volume of random data, made
# with the first binary; then ROUNDS rounds, each scrubbing with every binary
# cached and with --uncached, the page cache dropped before each run. Prints
# the wall time of each whole command (open, scrub, close) in seconds.
# Usage: bench/scrub_ab.sh [ROUNDS] BINARY...   (needs root for drop_caches)
set -euo pipefail
rounds=$1; shift
work=$(mktemp -d /var/tmp/chunkvol-scrubab.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$1" mkfs --data raid1 --metadata raid1 --size 2G a.img b.img >/dev/null
"$1" volume create v --size 1G a.img b.img >/dev/null
head -c 1G /dev/urandom > rand.bin
"$1" volume import v rand.bin a.img b.img >/dev/null
rm rand.bin
run() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
  python3 -c "print('%.2f' % ($t1 - $t0))"
}
for r in $(seq "$rounds"); do
  line="round $r:"
  for b in "$@"; do line+=" $b cached $(run "$b" scrub start -B a.img b.img)"; done
  for b in "$@"; do line+=" $b uncached $(run "$b" scrub start -B --uncached a.img b.img)"; done
  echo "$line"
done
