#!/usr/bin/env bash
# Puts promtool (for `promtool check config`) in <dir>/bin, default .tools/bin,
# taken from Debian's prometheus package. The package is unpacked, not
# installed: no prometheus service, user or data directory comes with it.
set -euo pipefail
dest=$(realpath -m "${1:-.tools}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get download prometheus >/dev/null 2>&1
fi
dpkg-deb -x prometheus_*.deb unpacked
install -D -m 0755 unpacked/usr/bin/promtool "$dest/bin/promtool"
"$dest/bin/promtool" --version | head -1
