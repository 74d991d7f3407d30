#!/usr/bin/env bash
# Scrub and the host page cache (issue 15, goal 5). A raid1 pool on two
# sparse files holding DATA of random data; a separate 256 MiB "hot" file
# a client read before. Inside a memory cgroup (v1 or v2) of LIMIT, so the
# page cache is as tight as on a busy host, for each reader: drop caches,
# read the hot file, time the reader, then count how much of the hot file
# and of the device files is cached (fincore). Readers: a raw buffered read
# of the device files' allocated ranges (the peer: what any cached reader
# does), chunkvol scrub (default: drop-behind) and scrub --uncached.
# Usage: bench/scrub_cache.sh [BINARY] [DATA] [LIMIT] [ROUNDS]  (needs root)
set -euo pipefail
cv=$(realpath "${1:-target/release/chunkvol}")
data=${2:-2G}
limit=${3:-1G}
rounds=${4:-3}
work=$(mktemp -d /var/tmp/chunkvol-scrubcache.XXXXXX)
cg=
cleanup() {
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
bytes=$(numfmt --from=iec "$data")
"$cv" mkfs --data raid1 --metadata raid1 --size "$(( bytes / 1073741824 + 2 ))G" a.img b.img >/dev/null
"$cv" volume create v --size "$data" a.img b.img >/dev/null
head -c "$bytes" /dev/urandom > rand.bin
"$cv" volume import v rand.bin a.img b.img >/dev/null
rm rand.bin
head -c 256M /dev/urandom > hot.bin
if [ -d /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/chunkvol-bench
  mkdir -p "$cg"
  echo "$(numfmt --from=iec "$limit")" > "$cg/memory.limit_in_bytes"
else
  cg=/sys/fs/cgroup/chunkvol-bench
  mkdir -p "$cg"
  echo "$(numfmt --from=iec "$limit")" > "$cg/memory.max"
fi
# Run "$@" inside the cgroup.
incg() { bash -c 'echo $$ > "$0/cgroup.procs"; exec "${@}"' "$cg" "$@"; }
cached() { fincore --bytes --noheadings --output RES "$1"; }
cat > raw_read.py <<'PY'
import os, sys, threading
def read(path):
    fd = os.open(path, os.O_RDONLY)
    end, pos = os.fstat(fd).st_size, 0
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        while pos < hole:
            pos += len(os.pread(fd, min(4 << 20, hole - pos), pos))
ths = [threading.Thread(target=read, args=(p,)) for p in sys.argv[1:]]
[t.start() for t in ths]
[t.join() for t in ths]
PY
echo "data $data in raid1, memory cgroup limit $limit, hot file 256 MiB; bytes cached after each reader"
printf '%-6s %-22s %8s %14s %14s %14s\n' round reader seconds hot.bin a.img b.img
for r in $(seq "$rounds"); do
  for reader in raw scrub scrub-uncached; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    incg cat hot.bin > /dev/null
    case $reader in
      raw) cmd=(python3 raw_read.py a.img b.img) ;;
      scrub) cmd=("$cv" scrub start -B a.img b.img) ;;
      scrub-uncached) cmd=("$cv" scrub start -B --uncached a.img b.img) ;;
    esac
    t0=$(date +%s.%N); incg "${cmd[@]}" > /dev/null; t1=$(date +%s.%N)
    printf '%-6s %-22s %8.2f %14s %14s %14s\n' "$r" "$reader" "$(echo "$t1 - $t0" | bc)" \
      "$(cached hot.bin)" "$(cached a.img)" "$(cached b.img)"
  done
done
