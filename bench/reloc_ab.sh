#!/usr/bin/env bash
# Relocation speed, A/B (issue 15): for each round and each binary, a raid1
# pool on two fresh 3 GiB sparse files under /var/tmp holding 512 MiB of
# random data (one volume, `volume import`), then an offline balance of the
# data groups (`balance start -d -B`) with the page cache dropped first;
# prints the wall time of the balance command.
# Usage: bench/reloc_ab.sh ROUNDS BINARY...   Needs: root (drop_caches).
set -euo pipefail
rounds=$1; shift
work=$(mktemp -d /var/tmp/chunkvol-relocab.XXXXXX)
trap 'rm -rf "$work"' EXIT
head -c $((512 << 20)) /dev/urandom >"$work/data.bin"
echo "| round | binary | balance -d (s) |"
echo "|---|---|---|"
for r in $(seq "$rounds"); do
  for bin in "$@"; do
    devs=("$work/a.img" "$work/b.img")
    "$bin" mkfs --data raid1 --metadata raid1 --size 3G "${devs[@]}" >/dev/null
    "$bin" volume create v --size 512M "${devs[@]}" >/dev/null
    "$bin" volume import v "$work/data.bin" "${devs[@]}" >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(date +%s%N)
    "$bin" balance start -d -B "${devs[@]}" >/dev/null
    t1=$(date +%s%N)
    awk -v r="$r" -v b="$bin" -v ns=$((t1 - t0)) 'BEGIN { printf "| %s | %s | %.2f |\n", r, b, ns / 1e9 }' 
    rm -f "${devs[@]}"
  done
done
