#!/usr/bin/env bash
# Installs the real clients and peers the test suite drives (Debian packages).
# A fresh machine has only Rust, gcc, Python and qemu-utils.
set -euo pipefail
need=()
for t in nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin nbdkit:nbdkit fio:fio \
         qemu-io:qemu-utils qemu-img:qemu-utils mkfs.ext4:e2fsprogs losetup:mount \
         fusermount3:fuse3 cmp:diffutils e2fsck:e2fsprogs debugfs:e2fsprogs \
         setpriv:util-linux openssl:openssl \
         systemd-analyze:systemd bash:bash script:bsdutils chromium:chromium; do
  cmd=${t%%:*}; pkg=${t##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
/usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || need+=(python3-prometheus-client)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2068
  $SUDO apt-get install -y -qq $(printf '%s\n' ${need[@]} | sort -u) >/dev/null
fi
echo "test dependencies present"
