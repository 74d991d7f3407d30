#!/usr/bin/env bash
# Flushes behind a dirty page cache: the order bench/run's NBD section runs
# its loads in (fio write 1M qd8, then randwrite 4k qd32, 5 s each), then
# 4 KiB random writes with an fsync after each (5 s), on a 1 GiB volume of a
# fresh 3G pool. Prints IOPS, then the commit and intent log counters.
# LOG=off runs the server with --intent-log off; SKIP=1 leaves the
# first two loads out (a clean page cache); PREALLOC=1 fallocates the whole
# device files before mkfs (an experiment: preallocation of fresh chunks).
# Usage: [LOG=on|off] [SKIP=1] [PREALLOC=1] bench/fsync_dirty.sh [single|raid1] [BINARY]
set -euo pipefail
prof=${1:-raid1}
bin=${2:-target/release/chunkvol}
work=$(mktemp -d /var/tmp/chunkvol-fsyncdirty.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$work"' EXIT
devs=("$work/a.img"); [ "$prof" = raid1 ] && devs+=("$work/b.img")
if [ -n "${PREALLOC:-}" ]; then for d in "${devs[@]}"; do fallocate -l 3G "$d"; done; fi
"$bin" mkfs --data "$prof" --size 3G "${devs[@]}" >/dev/null
"$bin" volume create disk0 --size 1G "${devs[@]}" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" serve --intent-log "${LOG:-on}" --listen "unix:$work/nbd.sock" --socket "$work/ctl.sock" \
  --metrics "$port" "${devs[@]}" >"$work/serve.log" 2>&1 &
srv=$!
for _ in $(seq 100); do [ -S "$work/ctl.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///disk0?socket=$work/nbd.sock"
load() { # RW BS DEPTH [FIO ARGS...]
  local rw=$1 bs=$2 qd=$3; shift 3
  fio --name=f --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=1G \
      --time_based --runtime=5 "$@" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.find("{"):])["jobs"][0]; print("%s: %.0f IOPS" % (sys.argv[1], j["write"]["iops"]))' "$rw $bs qd$qd $*"
}
if [ -z "${SKIP:-}" ]; then load write 1M 8; load randwrite 4k 32; fi
load randwrite 4k 1 --fsync=1
curl -s "127.0.0.1:$port/metrics" | grep -E "^chunkvol_(intent_log_(blocks|full)_total|commit_duration_seconds_(count|sum))"
