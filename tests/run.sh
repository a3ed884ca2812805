#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests, man page lint.
# Installs the Debian packages the integration tests need when running as root and they are
# missing; as a normal user the tests that need root or a package say so and skip.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libnbd-bin nbdfuse fio ucarp keepalived samba smbclient mandoc psmisc iproute2 nftables xfsprogs e2fsprogs fuse3 qemu-utils util-linux
  pacemaker corosync corosync-qnetd corosync-qdevice crmsh pacemaker-cli-utils resource-agents libxml2-utils kmod
  prometheus curl)
tools=(nbdinfo nbdfuse fio ucarp keepalived smbd smbclient mandoc fuser ip nft mkfs.xfs mkfs.ext4 fusermount3 qemu-io losetup
  pacemakerd corosync corosync-qnetd corosync-qdevice crm crm_mon ocf-tester xmllint modprobe
  promtool curl)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing test dependencies (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  else
    echo "tests/run.sh: missing ${missing[*]}; tests that need them will skip (run as root to install: apt-get install ${packages[*]})"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo clippy --all-features"
cargo clippy --all-targets --all-features --quiet -- -D warnings

# FreeBSD is a supported platform; without a FreeBSD sysroot nothing links, so the type check
# and the lints are the gate. A silently skipped platform is how it broke before: in CI a
# missing target fails the run.
freebsd=x86_64-unknown-freebsd
if ! rustup target list --installed 2>/dev/null | grep -qx "$freebsd"; then
  echo "== rustup target add $freebsd"
  rustup target add "$freebsd" || true
fi
if rustup target list --installed 2>/dev/null | grep -qx "$freebsd"; then
  echo "== cargo clippy --target $freebsd"
  cargo clippy --all-targets --quiet --target "$freebsd" -- -D warnings
  echo "== cargo clippy --all-features --target $freebsd"
  cargo clippy --all-targets --all-features --quiet --target "$freebsd" -- -D warnings
else
  echo "!! tests/run.sh: the Rust target $freebsd is not installed and rustup could not add it:"
  echo "!! the FreeBSD build was NOT checked."
  if [ "${CI:-}" = true ]; then
    echo "!! failing because CI=true: a skipped platform is a broken platform."
    exit 1
  fi
fi
if command -v mandoc >/dev/null; then
  echo "== mandoc -Tlint man/*"
  mandoc -Tlint -W warning man/*
fi
# The tests run against a build with the fault-injection disk layer (feature `faults`: power
# cuts, EIO, torn writes; tests/daemon_power.rs needs it). The binary for users is built
# without it.
echo "== cargo test --features faults"
cargo test --release --features faults -- --test-threads=2 "$@"
