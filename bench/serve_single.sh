# Sourced by the A/B bench scripts. serve_single BINARY DIR: a fresh single
# pool in DIR (sparse file a.img, volume disk0 of 1 GiB) served by BINARY
# on DIR/nbd.sock (control socket DIR/ctl.sock, log DIR/serve.log); sets
# srv to the server's pid once the control socket is there.
serve_single() {
  local bin=$1 dir=$2
  "$bin" mkfs --data single --size 3G "$dir/a.img" >/dev/null
  "$bin" volume create disk0 --size 1G "$dir/a.img" >/dev/null
  "$bin" serve --listen "unix:$dir/nbd.sock" --socket "$dir/ctl.sock" "$dir/a.img" >"$dir/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 100); do [ -S "$dir/ctl.sock" ] && break; sleep 0.1; done
}
