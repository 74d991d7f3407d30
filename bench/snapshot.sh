#!/usr/bin/env bash
# Snapshot cost against volume size (issue 14, benchmark 7): for each size,
# a single-profile pool on a sparse file, the volume filled with random data
# through NBD (nbdcopy from nbdkit's random plugin), then timed:
#   - `volume snapshot` of a volume with nothing dirty (commit + one copied
#     root block + commit), the second of two taken back to back;
#   - 4 KiB random writes for 10 s (fio, nbd engine) before and right after
#     a snapshot (the first write to each shared leaf copies it);
#   - first-write cost isolated: the time of 16384 random 4 KiB writes (fio,
#     fixed count, fresh offsets) on the volume right after a flush, then
#     right after a snapshot (nearly every write the first to its leaf);
#   - `volume diff` after 1 % of the volume was rewritten in 4 KiB blocks,
#     and after a fixed 16384 blocks (64 MiB) were.
# Usage: bench/snapshot.sh [SIZE...]   (default: 1G 8G; sizes for nbdkit)
# Needs: a release build (cargo build --release), nbdkit, nbdcopy, fio.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CHUNKVOL:-target/release/chunkvol}
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1G 8G)
work=$(mktemp -d /var/tmp/chunkvol-snapbench.XXXXXX)
trap 'kill $srv 2>/dev/null || true; rm -rf "$work"' EXIT
bytes() { numfmt --from=iec "$1"; }
now() { date +%s.%N; }
sub() { python3 -c "print(f'{$1 - $2:.3f}')"; }
fio_iops() { # URI SECONDS
  fio --name=w --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 \
      --size=256M --time_based --runtime="$2" --output-format=json 2>"$work/fio.err" |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(round(json.loads(s[s.find("{"):])["jobs"][0]["write"]["iops"]))'
}
fio_secs() { # URI SEED: seconds for 16384 random 4 KiB writes, then a flush
  fio --name=n --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 \
      --number_ios=16384 --io_size=64M --randseed="$2" --end_fsync=1 \
      --output-format=json 2>"$work/fio.err" |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.find("{"):])["jobs"][0]; print("%.2f" % (j["job_runtime"] / 1000))'
}
diff_secs() { # SNAP: seconds and ranges of `volume diff SNAP v`
  local t0 t1 n
  t0=$(now); n=$("$bin" volume diff "$1" v --json "${ctl[@]}" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["changed"]))'); t1=$(now)
  echo "$(sub "$t1" "$t0") $n"
}
printf '| volume | snapshot s | randwrite 4k IOPS before | right after snapshot | 16k writes after flush s | right after snapshot s | diff of 1 %% s (ranges) | diff of 64 MiB s (ranges) |\n|---|---|---|---|---|---|---|---|\n'
for size in "${sizes[@]}"; do
  b=$(bytes "$size")
  dev="$work/dev-$size.img"
  "$bin" mkfs --data single --metadata dup --size $((b + b / 4 + (2 << 30))) "$dev" >/dev/null
  "$bin" serve --listen "unix:$work/nbd.sock" --socket "$work/ctl.sock" "$dev" >"$work/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 100); do [ -S "$work/ctl.sock" ] && break; sleep 0.1; done
  ctl=(--socket "$work/ctl.sock")
  "$bin" volume create v --size "$size" "${ctl[@]}" >/dev/null
  uri="nbd+unix:///v?socket=$work/nbd.sock"
  nbdcopy --flush -- [ nbdkit random size="$size" ] "$uri"
  w_flushed=$(fio_secs "$uri" 11)
  w_snapped=$("$bin" volume snapshot v first "${ctl[@]}" >/dev/null; fio_secs "$uri" 12)
  before=$(fio_iops "$uri" 10)
  # A first snapshot commits what fio left dirty: the timed one then
  # measures the snapshot itself.
  "$bin" volume snapshot v warm "${ctl[@]}" >/dev/null
  t0=$(now); "$bin" volume snapshot v s0 "${ctl[@]}" >/dev/null; t1=$(now)
  after=$(fio_iops "$uri" 10)
  "$bin" volume snapshot v s1 "${ctl[@]}" >/dev/null
  fio --name=p --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
      --io_size=$((b / 100)) --randrepeat=0 >/dev/null 2>&1
  read -r d1 r1 < <(diff_secs s1)
  "$bin" volume snapshot v s2 "${ctl[@]}" >/dev/null
  fio_secs "$uri" 13 >/dev/null
  read -r d2 r2 < <(diff_secs s2)
  printf '| %s | %s | %s | %s | %s | %s | %s (%s) | %s (%s) |\n' "$size" "$(sub "$t1" "$t0")" \
    "$before" "$after" "$w_flushed" "$w_snapped" "$d1" "$r1" "$d2" "$r2"
  kill "$srv"; wait "$srv" 2>/dev/null || true
  rm -f "$dev" "$work"/*.sock
done
