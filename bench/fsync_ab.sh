#!/usr/bin/env bash
# Flush-heavy clients (issue 15, goal 3): fio 4 KiB random writes at queue
# depth 1 with an fsync (NBD FLUSH) after every write, 10 s, one connection.
# chunkvol single and raid1 with the intent log on and off
# (`serve --intent-log off` makes every flush a commit) against qemu-nbd
# qcow2 and nbdkit file, in the same run, for ROUNDS rounds. Fresh sparse
# files under /var/tmp each time; qemu-nbd runs as bench/run starts it.
# Usage: bench/fsync_ab.sh [BINARY [ROUNDS]]   Needs: fio, nbdkit, qemu-nbd.
set -euo pipefail
bin=${1:-target/release/chunkvol}
rounds=${2:-3}
work=$(mktemp -d /var/tmp/chunkvol-fsyncbench.XXXXXX)
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$work"' EXIT
fio_run() { # URI -> IOPS
  fio --name=f --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=1 --fsync=1 \
      --size=512M --time_based --runtime=10 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); print("%.0f" % json.loads(s[s.find("{"):])["jobs"][0]["write"]["iops"])'
}
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; }
chunkvol_run() { # PROFILE LOG(on|off) -> IOPS
  local devs=("$work/a.img"); [ "$1" = raid1 ] && devs+=("$work/b.img")
  "$bin" mkfs --data "$1" --metadata "$1" --size 3G "${devs[@]}" >/dev/null
  "$bin" serve --intent-log "$2" --listen "unix:$work/nbd.sock" --socket "$work/ctl.sock" \
    "${devs[@]}" >"$work/serve.log" 2>&1 &
  srv=$!
  wait_sock "$work/ctl.sock"
  "$bin" volume create v --size 1G --socket "$work/ctl.sock" >/dev/null
  fio_run "nbd+unix:///v?socket=$work/nbd.sock"
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
  rm -f "$work"/*.img "$work"/*.sock
}
peer_run() { # qcow2|file -> IOPS
  if [ "$1" = qcow2 ]; then
    qemu-img create -q -f qcow2 "$work/p.qcow2" 1G
    qemu-nbd -k "$work/nbd.sock" -f qcow2 -x disk0 --cache=writeback -e 8 -t "$work/p.qcow2" &
  else
    truncate -s 1G "$work/p.raw"
    nbdkit -f -U "$work/nbd.sock" file "$work/p.raw" &
  fi
  srv=$!
  wait_sock "$work/nbd.sock"
  local export=""; [ "$1" = qcow2 ] && export=disk0
  fio_run "nbd+unix:///$export?socket=$work/nbd.sock"
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
  rm -f "$work"/p.* "$work"/*.sock
}
printf '| round | chunkvol single, log | single, no log | raid1, log | raid1, no log | qemu-nbd qcow2 | nbdkit file |\n|---|---|---|---|---|---|---|\n'
for r in $(seq "$rounds"); do
  a=$(chunkvol_run single on); b=$(chunkvol_run single off)
  c=$(chunkvol_run raid1 on); d=$(chunkvol_run raid1 off)
  q=$(peer_run qcow2); n=$(peer_run file)
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$r" "$a" "$b" "$c" "$d" "$q" "$n"
done
