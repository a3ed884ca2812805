#!/bin/bash
# The failover lab: two storage hosts A and B and a client C as network namespaces on one
# machine, joined by a bridge in its own namespace, with real ucarp, real smbd and tandem.
#
#   tests/lab/lab.sh up BACKEND MODE     build the lab (BACKEND: none | tandem;
#                                        MODE: switch | baseline | watch | keepalived)
#   tests/lab/lab.sh boot A|B [preempt]  start a host (daemon, watcher, ucarp)
#   tests/lab/lab.sh scenario NAME       run one scenario on a fresh lab (see scenarios.sh)
#   tests/lab/lab.sh state               who holds the VIP, what is mounted, roles
#   tests/lab/lab.sh down                tear everything down (processes by PID, mounts, loops)
#
# Addresses: 198.18.0.1 (A), .2 (B), .3 (client C), VIP 198.18.0.10/24; nothing else is
# touched: the root namespace gets no address or route in 198.18.0.0/24, and the lab refuses
# to start when the root namespace already uses that range. Mounts stay visible in the root
# namespace because the hosts only get their own *network* namespace (nsenter --net).
#
# Environment: LAB_DIR (default /tmp/lab), TANDEM (the binary; default target/debug/tandem),
# LAB_BACKEND / LAB_MODE (defaults for `scenario`), LAB_DISK_MB (default 1024), LAB_FS (the
# share's filesystem: ext4, the default, or xfs), LAB_NS (namespace prefix, default tl).

set -u
set -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LAB=${LAB_DIR:-/tmp/lab}
TANDEM=${TANDEM:-$ROOT/target/debug/tandem}
NET=198.18.0
VIP=$NET.10
DISK_MB=${LAB_DISK_MB:-1024}
# Namespace names: LAB_NS (default tl) + A, B, C, br; a prefix of its own lets two labs run
# side by side on one machine (with their own LAB_DIR).
NS=${LAB_NS:-tl}
NETNS=("${NS}A" "${NS}B" "${NS}C" "${NS}br")

declare -A IP=([A]=$NET.1 [B]=$NET.2 [C]=$NET.3)
declare -A PEER=([A]=B [B]=A)
# Lower skew wins: A is the preferred master.
declare -A SKEW=([A]=1 [B]=20)

log() { printf '%s lab: %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }
fail() {
	log "FAIL: $*"
	exit 1
}
now() { date +%s.%N | cut -c1-14; }

# Run in a host's network namespace (same mount namespace: mounts stay visible).
in_ns() {
	local h=$1
	shift
	nsenter --net=/run/netns/"$NS$h" "$@"
}

backend() { cat "$LAB/backend" 2>/dev/null || echo none; }
fstype() { cat "$LAB/fs" 2>/dev/null || echo ext4; }
# xfs refuses a second filesystem with the UUID of one still mounted, and the crashed host's
# lingers a moment in this one kernel (two machines do not share one): nouuid, in the lab only.
mount_options() { [ "$(fstype)" = xfs ] && echo noatime,nouuid || echo noatime; }
# Make the share's filesystem on $1.
mkfs_share() {
	case $(fstype) in
	xfs) mkfs.xfs -q -f "$1" ;;
	*) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$1" ;;
	esac
}
mode() { cat "$LAB/mode" 2>/dev/null || echo switch; }
hdir() { echo "$LAB/$1"; }
cfg() { echo "$LAB/$1/tandem.toml"; }
tandem() {
	local h=$1
	shift
	"$TANDEM" -c "$(cfg "$h")" --node "$h" "$@"
}

# Poll `cmd` every 100 ms until it succeeds, for at most `secs` seconds.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local i n=$((secs * 10))
	for ((i = 0; i < n; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	log "timed out after ${secs}s waiting for: $what"
	return 1
}

# wait_for, checking every 20 ms: for the steps of a failover (a service manager or udev
# does not sleep 100 ms between looks either).
wait_fast() {
	local secs=$1 what=$2
	shift 2
	local i n=$((secs * 50))
	for ((i = 0; i < n; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.02
	done
	log "timed out after ${secs}s waiting for: $what"
	return 1
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
not_alive() { ! pid_alive "$1"; }

# Kill a process by PID: TERM, wait up to `secs`, then KILL.
stop_pid() {
	local pid=$1 secs=${2:-5} i
	pid_alive "$pid" || return 0
	kill -TERM "$pid" 2>/dev/null
	for ((i = 0; i < secs * 10; i++)); do
		pid_alive "$pid" || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null
	for ((i = 0; i < 20; i++)); do
		pid_alive "$pid" || return 0
		sleep 0.1
	done
}

# ---------------------------------------------------------------------------------------------
# Preflight and network.

preflight() {
	[ "$(id -u)" = 0 ] || fail "the lab needs root (network namespaces, mounts, loop devices)"
	local t
	for t in ucarp smbd smbclient ip nsenter losetup mkfs.ext4 e2fsck sha256sum; do
		command -v "$t" >/dev/null || fail "missing tool: $t"
	done
	if [ "$(mode)" = keepalived ]; then
		command -v keepalived >/dev/null || fail "missing tool: keepalived (Debian package keepalived)"
	fi
	if [ "$(fstype)" = xfs ]; then
		command -v mkfs.xfs >/dev/null || fail "missing tool: mkfs.xfs (Debian package xfsprogs)"
	fi
	if [ "$(backend)" = tandem ]; then
		command -v nbdfuse >/dev/null || fail "missing tool: nbdfuse (Debian package nbdfuse)"
	fi
	[ -x "$TANDEM" ] || fail "no tandem binary at $TANDEM (cargo build, or set TANDEM)"
	# (Output captured first: with pipefail, grep -q could turn a match into a failure.)
	if grep -q " $NET\." <<<"$(ip -4 -o addr show)"; then
		fail "the root namespace already has an address in $NET.0/24: refusing to build the lab"
	fi
	if grep -q "^$NET\." <<<"$(ip -4 route show)"; then
		fail "the root namespace already routes $NET.0/24: refusing to build the lab"
	fi
}

net_up() {
	local ns h
	for ns in "${NETNS[@]}"; do
		ip netns add "$ns" || fail "ip netns add $ns"
		ip -n "$ns" link set lo up
	done
	ip -n "${NS}br" link add br0 type bridge || fail "bridge"
	ip -n "${NS}br" link set br0 up
	for h in A B C; do
		# The veth is born in ${NS}br with its peer directly in the host: never in the root ns.
		ip -n "${NS}br" link add "p$h" type veth peer name lab0 netns "$NS$h" || fail "veth for $h"
		ip -n "${NS}br" link set "p$h" master br0 up
		ip -n "$NS$h" addr add "${IP[$h]}/24" dev lab0
		ip -n "$NS$h" link set lab0 up
	done
}

# Cut / heal a host's cable (the bridge port goes down: the host sees no carrier).
link_set() { ip -n "${NS}br" link set "p$1" "$2"; }

# Partition / heal: the host's port leaves the bridge. Its link keeps carrier (a failed
# switch between the hosts, not a pulled cable), so its ucarp stays master.
partition() { ip -n "${NS}br" link set "p$1" nomaster; }
heal() { ip -n "${NS}br" link set "p$1" master br0; }

# ---------------------------------------------------------------------------------------------
# Per-host files: tandem config, smb.conf, hooks.

write_host() {
	local h=$1 d
	d=$(hdir "$h")
	mkdir -p "$d"/{mnt,fuse,log,smb/run,smb/lock,smb/state,smb/cache,smb/private,smb/ncalrpc}
	chmod 700 "$d/smb/private"
	local dev
	if [ "$(backend)" = none ]; then
		# Each host sees the shared disk through a device of its own, as two machines see
		# one LUN: the survivor's fsck never finds the device held by the crashed host's
		# filesystem, which lingers a moment in this one kernel.
		dev=$(cat "$LAB/shared.loop.$h")
	else
		dev=$d/dev
	fi
	{
		cat <<EOF
# Lab host $h (generated by tests/lab/lab.sh). Both hosts' files differ only in paths,
# because both hosts share this machine's filesystem.
node = "$h"

[log]
tag = "tandem-$h"
level = "debug"

[switch]
lock = "$d/switch.lock"
delay = "0s"
role_timeout = "10s"
device_timeout = "15s"
stop_timeout = "5s"

[daemon]
listen = ["${IP[$h]}:8457"]
control = "$d/control.sock"
secret = "$LAB/secret"
EOF
		if [ "$(mode)" = keepalived ]; then
			# Below what VRRP with 200 ms adverts needs to notice a dead master (3 missed
			# adverts + skew, about 650 ms): the daemon knows the peer is gone first.
			cat <<EOF
timeout = "500ms"
ping_interval = "100ms"
EOF
		fi
		if [ "$(mode)" = watch ]; then
			cat <<EOF

[watch]
address = "$VIP"
interface = "lab0"
EOF
		fi
		cat <<EOF

[[service]]
name = "smbd"
manager = "command"
start = "$HERE/lab.sh smbd-start $h"
stop = "$HERE/lab.sh smbd-stop $h"
status = "$HERE/lab.sh smbd-status $h"

[resource.share]
backend = "$(backend)"
mountpoint = "$d/mnt"
fstype = "$(fstype)"
mount_options = "$(mount_options)"
device = "$dev"
EOF
		if [ "$(backend)" = tandem ]; then
			cat <<EOF
attach = "$HERE/lab.sh attach $h"
detach = "$HERE/lab.sh detach $h"
nbd = "$d/share.nbd"
extent_size = "512K"

[resource.share.on.A]
local = "$LAB/A/disk.img"
remote = "${IP[B]}:8457"

[resource.share.on.B]
local = "$LAB/B/disk.img"
remote = "${IP[A]}:8457"
EOF
		fi
	} >"$(cfg "$h")"

	cat >"$d/smb.conf" <<EOF
# smbd of lab host $h: everything private to this host, bound to the VIP only.
[global]
	netbios name = LAB$h
	workgroup = LAB
	server role = standalone server
	disable netbios = yes
	smb ports = 445
	bind interfaces only = yes
	interfaces = $VIP
	pid directory = $d/smb/run
	lock directory = $d/smb/lock
	state directory = $d/smb/state
	cache directory = $d/smb/cache
	private dir = $d/smb/private
	ncalrpc dir = $d/smb/ncalrpc
	passdb backend = tdbsam:$d/smb/private/passdb.tdb
	log file = $d/log/smbd.log
	max log size = 0
	logging = file
	map to guest = Bad User
	guest account = root
	load printers = no
	printcap name = /dev/null
	disable spoolss = yes
	rpc start on demand helpers = no
	usershare path =
	server min protocol = SMB2

[share]
	path = $d/mnt
	read only = no
	guest ok = yes
	force user = root
	# A write the client sees acknowledged is on disk (and, with tandem, on the peer): smbd
	# fsyncs each write, as a file server in front of replicated storage must.
	strict sync = yes
	sync always = yes
EOF
}

write_client() {
	local d=$LAB/C
	mkdir -p "$d"/{files,got,smb/lock,smb/state,smb/cache,smb/private}
	: >"$d/acked"
	cat >"$d/smb.conf" <<EOF
[global]
	lock directory = $d/smb/lock
	state directory = $d/smb/state
	cache directory = $d/smb/cache
	private dir = $d/smb/private
	client min protocol = SMB2
	log file = $d/smbclient.log
EOF
}

# ---------------------------------------------------------------------------------------------
# Service (smbd), called by tandem through [[service]] manager = "command".

smbd_pid() { cat "$(hdir "$1")"/smb/run/smbd*.pid 2>/dev/null | head -n1; }

cmd_smbd_start() {
	local h=$1
	cmd_smbd_status "$h" && return 0
	rm -f "$(hdir "$h")"/smb/run/smbd*.pid
	# stdio away from the caller's pipes: smbd must not keep tandem's stderr open.
	smbd -D -s "$(hdir "$h")/smb.conf" </dev/null >>"$(hdir "$h")/log/smbd.out" 2>&1 ||
		fail "smbd -D failed on $h"
	wait_fast 10 "smbd pidfile on $h" cmd_smbd_status "$h" || exit 1
}

cmd_smbd_stop() {
	local h=$1 pid
	pid=$(smbd_pid "$h")
	[ -n "$pid" ] && stop_pid "$pid" 5
	rm -f "$(hdir "$h")"/smb/run/smbd*.pid
	return 0
}

cmd_smbd_status() { pid_alive "$(smbd_pid "$1")"; }

# ---------------------------------------------------------------------------------------------
# Device hooks for backend tandem: the NBD export becomes a file through nbdfuse, then a loop
# device; $TANDEM_DEVICE is a symlink to it (this kernel has no nbd module).

cmd_attach() {
	local h=$1 d sock dev
	d=$(hdir "$h")
	sock=${TANDEM_NBD:-$d/share.nbd}
	dev=${TANDEM_DEVICE:-$d/dev}
	if [ -L "$dev" ] && [ -b "$dev" ]; then return 0; fi
	# A FUSE mount whose nbdfuse died is dead: drop it before mounting afresh.
	if mounted_at "$d/fuse" && ! pid_alive "$(cat "$d/fuse.pid" 2>/dev/null)"; then
		drop_fuse "$d/fuse"
	fi
	if ! mounted_at "$d/fuse"; then
		rm -f "$d/fuse.pid"
		mkdir -p "$d/fuse"
		# MOUNTPOINT/FILENAME spelled out: nbdfuse must never mount on the host directory.
		setsid nbdfuse -P "$d/fuse.pid" "$d/fuse/nbd" --unix "$sock" \
			</dev/null >>"$d/log/nbdfuse.log" 2>&1 &
		wait_fast 10 "nbdfuse on $h" test -s "$d/fuse.pid" || exit 1
	fi
	local loop
	loop=$(losetup --find --show "$d/fuse/nbd") || fail "losetup $d/fuse/nbd"
	ln -sfn "$loop" "$dev"
}

cmd_detach() {
	local h=$1 d dev loop
	d=$(hdir "$h")
	dev=${TANDEM_DEVICE:-$d/dev}
	if [ -L "$dev" ]; then
		loop=$(readlink "$dev")
		rm -f "$dev"
		[ -b "$loop" ] && losetup -d "$loop" 2>/dev/null
	fi
	# Any other loop device still backed by our nbdfuse file (a crash left it behind).
	# (Matched by name in the loop table: no stat through a FUSE mount that may be dead.)
	losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v f="$d/fuse/nbd" '$2 == f { print $1 }' |
		while read -r loop; do losetup -d "$loop" 2>/dev/null; done
	local pid
	pid=$(cat "$d/fuse.pid" 2>/dev/null)
	if mounted_at "$d/fuse"; then
		if pid_alive "$pid"; then
			fusermount3 -u "$d/fuse" 2>/dev/null || drop_fuse "$d/fuse"
		else
			drop_fuse "$d/fuse"
		fi
	fi
	[ -n "$pid" ] && stop_pid "$pid" 5
	rm -f "$d/fuse.pid"
	return 0
}

# Is something mounted exactly at $1? (From the mount table: stat on a dead FUSE mount fails.)
mounted_at() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# Detach a FUSE mount whatever its state: abort the connection (unblocks anything stuck in
# it), then lazy unmount.
drop_fuse() {
	local m=$1 dev
	dev=$(awk -v m="$m" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n1)
	if [ -n "$dev" ] && [ -e "/sys/fs/fuse/connections/${dev#*:}/abort" ]; then
		echo 1 >"/sys/fs/fuse/connections/${dev#*:}/abort" 2>/dev/null
	fi
	umount -l "$m" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# ucarp up/down scripts. ucarp waits for its scripts and sends no advertisements meanwhile, so
# they only move the address and hand the rest to a background process (like keepalived's
# notify). Each line of that process's stderr gets a wall-clock timestamp in log/switch.log.

stamp() { while IFS= read -r line; do printf '%s %s\n' "$(now)" "$line"; done; }

cmd_carp_event() {
	local h=$1 ev=$2
	shift 2
	local d
	d=$(hdir "$h")
	echo "$(now) carp $ev $*" >>"$d/log/switch.log"
	if [ "$ev" = master ]; then
		ip addr add "$VIP/24" dev lab0 2>/dev/null
	else
		ip addr del "$VIP/24" dev lab0 2>/dev/null
	fi
	case $(mode) in
	watch) ;; # tandem watch sees the address move and runs the switch.
	baseline)
		setsid "$HERE/baseline-switch" "$ev" "$h" </dev/null 2>&1 | stamp >>"$d/log/switch.log" &
		;;
	*)
		(setsid "$TANDEM" -c "$(cfg "$h")" --node "$h" switch "$ev" "$@" </dev/null 2>&1 |
			stamp >>"$d/log/switch.log") &
		;;
	esac
}

# ---------------------------------------------------------------------------------------------
# Lab life cycle.

cmd_up() {
	local be=${1:-none} md=${2:-switch}
	LAB_KEEP= cmd_down quiet
	mkdir -p "$LAB"
	echo "$be" >"$LAB/backend"
	echo "$md" >"$LAB/mode"
	echo "${LAB_FS:-ext4}" >"$LAB/fs"
	preflight
	log "building the lab in $LAB: backend=$be mode=$md"
	head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$LAB/secret"
	chmod 600 "$LAB/secret"
	net_up
	write_client
	if [ "$be" = none ]; then
		# One shared disk, like a SAN LUN visible to both hosts.
		truncate -s "${DISK_MB}M" "$LAB/shared.img"
		losetup --find --show "$LAB/shared.img" >"$LAB/shared.loop" || fail "losetup"
		mkfs_share "$(cat "$LAB/shared.loop")" || fail "mkfs"
		cp "$LAB/shared.loop" "$LAB/shared.loop.A"
		losetup --find --show "$LAB/shared.img" >"$LAB/shared.loop.B" || fail "losetup"
	fi
	write_host A
	write_host B
	if [ "$be" = tandem ]; then
		local h
		for h in A B; do
			truncate -s "${DISK_MB}M" "$LAB/$h/disk.img"
			tandem "$h" create share >>"$LAB/$h/log/daemon.log" 2>&1 || fail "tandem create on $h"
			start_daemon "$h"
		done
		# First primary: make the filesystem through A's export, then sync it to B.
		tandem B role secondary share || fail "role secondary on B"
		tandem A role primary share || fail "role primary on A"
		wait_for 10 "A's NBD export" test -S "$LAB/A/share.nbd" || fail "no NBD export on A"
		TANDEM_NBD=$LAB/A/share.nbd TANDEM_DEVICE=$LAB/A/dev cmd_attach A
		mkfs_share "$LAB/A/dev" || fail "mkfs"
		cmd_detach A
		tandem A wait-sync share --timeout 120s || fail "initial sync did not complete"
	fi
	log "lab is up"
}

start_daemon() {
	local h=$1 d
	d=$(hdir "$h")
	[ "$(backend)" = tandem ] || return 0
	pid_alive "$(cat "$d/daemon.pid" 2>/dev/null)" && return 0
	rm -f "$d/control.sock"
	in_ns "$h" "$TANDEM" -c "$(cfg "$h")" --node "$h" daemon </dev/null >>"$d/log/daemon.log" 2>&1 &
	disown
	echo $! >"$d/daemon.pid"
	wait_for 10 "daemon control socket on $h" test -S "$d/control.sock" || fail "daemon on $h"
}

start_watch() {
	local h=$1 d
	d=$(hdir "$h")
	[ "$(mode)" = watch ] || return 0
	pid_alive "$(cat "$d/watch.pid" 2>/dev/null)" && return 0
	# --carrier: a host whose link has no carrier is slave even if the address lingers.
	(in_ns "$h" "$TANDEM" -c "$(cfg "$h")" --node "$h" watch --carrier lab0 </dev/null 2>&1 |
		stamp >>"$d/log/switch.log") &
	disown
	# The watcher is the process in the host's namespace that runs tandem watch.
	local i pid=
	for ((i = 0; i < 50; i++)); do
		pid=$(pgrep -n -f -x "$TANDEM -c $(cfg "$h") --node $h watch --carrier lab0" || true)
		[ -n "$pid" ] && break
		sleep 0.1
	done
	[ -n "$pid" ] || fail "tandem watch did not start on $h"
	echo "$pid" >"$d/watch.pid"
}

cmd_carp_start() {
	local h=$1 preempt=${2:-}
	local d
	d=$(hdir "$h")
	if [ "$(mode)" = keepalived ]; then
		vrrp_start "$h" "$preempt"
		return
	fi
	# -b 1 -r 2: an advertisement every second, the master is dead after two missed ones.
	local args=(-i lab0 -s "${IP[$h]}" -v 1 -p labsecret -a "$VIP" -b 1 -r 2
		-k "${SKEW[$h]}" -z -x "$h" -u "$HERE/ucarp-up" -d "$HERE/ucarp-down")
	[ "$preempt" = preempt ] && args+=(-P)
	in_ns "$h" env LAB_DIR="$LAB" TANDEM="$TANDEM" ucarp "${args[@]}" \
		</dev/null >>"$d/log/ucarp.log" 2>&1 &
	disown
	echo $! >"$d/ucarp.pid"
}

cmd_carp_stop() {
	local h=$1 pid
	pid=$(cat "$(hdir "$h")/ucarp.pid" 2>/dev/null)
	[ -n "$pid" ] && stop_pid "$pid" 10
	rm -f "$(hdir "$h")/ucarp.pid"
}

# keepalived instead of ucarp: VRRPv3 with an advertisement every 200 ms, so a dead master
# is noticed after 3 missed ones plus the skew, about 0.65 s (ucarp cannot go below 1 s
# between adverts). keepalived moves the VIP itself and runs its notify scripts without
# waiting for them; `vrrp-event` logs the change and runs `tandem switch`.
declare -A VRRP_PRIO=([A]=150 [B]=100)

vrrp_start() {
	local h=$1 preempt=${2:-} d ev
	d=$(hdir "$h")
	local notify="env LAB_DIR=$LAB LAB_NS=$NS TANDEM=$TANDEM $HERE/lab.sh vrrp-event $h"
	{
		cat <<EOF
# keepalived of lab host $h (generated by tests/lab/lab.sh).
global_defs {
    router_id lab$h
    vrrp_version 3
    script_user root
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 1
}

vrrp_instance lab {
    state BACKUP
    interface lab0
    virtual_router_id 51
    priority ${VRRP_PRIO[$h]}
    advert_int 0.2
EOF
		[ "$preempt" = preempt ] || echo "    nopreempt"
		cat <<EOF
    virtual_ipaddress {
        $VIP/24 dev lab0
    }
EOF
		for ev in master backup fault stop; do
			echo "    notify_$ev \"$notify $ev\""
		done
		echo "}"
	} >"$d/keepalived.conf"
	in_ns "$h" keepalived -n -l -D -P -G -f "$d/keepalived.conf" -p "$d/keepalived.pid" \
		-r "$d/keepalived-vrrp.pid" -i "lab$h" </dev/null >>"$d/log/keepalived.log" 2>&1 &
	disown
	echo $! >"$d/ucarp.pid"
}

# keepalived's notify: log the VRRP state change (as `carp master|slave`, which the bench
# reads), then `tandem switch` in the background.
cmd_vrrp_event() {
	local h=$1 ev=$2 d word
	d=$(hdir "$h")
	case $ev in
	master) word=master ;;
	*) word=slave ;;
	esac
	echo "$(now) carp $word vrrp $ev" >>"$d/log/switch.log"
	(setsid "$TANDEM" -c "$(cfg "$h")" --node "$h" switch "$ev" </dev/null 2>&1 |
		stamp >>"$d/log/switch.log") &
}

# Boot a host: daemon, `switch slave` (an rc script's demote at boot), watcher, ucarp.
cmd_boot() {
	local h=$1 preempt=${2:-}
	ip -n "$NS$h" link set lab0 up
	start_daemon "$h"
	if [ "$(mode)" = baseline ]; then
		"$HERE/baseline-switch" slave "$h" 2>&1 | stamp >>"$(hdir "$h")/log/switch.log"
	else
		in_ns "$h" "$TANDEM" -c "$(cfg "$h")" --node "$h" switch slave 2>&1 |
			stamp >>"$(hdir "$h")/log/switch.log"
	fi
	start_watch "$h"
	cmd_carp_start "$h" "$preempt"
}

# A crash: every process of the host dies at once (everything in its network namespace),
# its NIC goes dark, and its mounts and devices vanish the way a power cut drops them.
cmd_crash() {
	local h=$1 d pids i
	d=$(hdir "$h")
	log "crashing $h"
	echo "$(now) crash" >>"$d/log/switch.log"
	ip -n "$NS$h" link set lab0 down
	# shellcheck disable=SC2046
	kill -KILL $(ip netns pids "$NS$h") 2>/dev/null
	# The mount goes with the processes, as a power cut drops it: at once, not after the
	# checks below (with one shared disk, the survivor's fsck finds it busy otherwise).
	umount -l "$d/mnt" 2>/dev/null
	for ((i = 0; i < 5; i++)); do
		pids=$(ip netns pids "$NS$h")
		[ -z "$pids" ] && break
		# shellcheck disable=SC2086
		kill -KILL $pids 2>/dev/null
		sleep 0.2
	done
	ip -n "$NS$h" addr del "$VIP/24" dev lab0 2>/dev/null
	[ "$(backend)" = tandem ] && cmd_detach "$h"
	rm -f "$d"/{ucarp,daemon,watch}.pid "$d"/smb/run/smbd*.pid
	return 0
}

cmd_down() {
	local quiet=${1:-} h ns pids i d
	[ -d "$LAB" ] || [ -e "/run/netns/${NS}A" ] || return 0
	[ -z "$quiet" ] && log "tearing the lab down"
	for h in A B; do
		d=$(hdir "$h")
		[ -d "$d" ] || continue
		# Graceful first, so ucarp's shutdown script does not race the kills below.
		pid=$(cat "$d/ucarp.pid" 2>/dev/null)
		[ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
	done
	# Every process we started lives in one of our namespaces: kill them by PID.
	for ((i = 0; i < 10; i++)); do
		pids=
		for ns in "${NETNS[@]}"; do
			[ -e "/run/netns/$ns" ] && pids="$pids $(ip netns pids "$ns" 2>/dev/null)"
		done
		[ -z "${pids// /}" ] && break
		# shellcheck disable=SC2086
		kill -KILL $pids 2>/dev/null
		sleep 0.2
	done
	local pid
	for h in A B; do
		d=$(hdir "$h")
		[ -d "$d" ] || continue
		for f in daemon watch; do
			pid=$(cat "$d/$f.pid" 2>/dev/null)
			[ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
		done
		umount -l "$d/mnt" 2>/dev/null
		TANDEM_DEVICE=$d/dev cmd_detach "$h" 2>/dev/null
	done
	for f in "$LAB"/shared.loop "$LAB"/shared.loop.B; do
		[ -s "$f" ] && losetup -d "$(cat "$f")" 2>/dev/null
	done
	for ns in "${NETNS[@]}"; do
		[ -e "/run/netns/$ns" ] && ip netns del "$ns"
	done
	if [ -n "${LAB_KEEP:-}" ]; then
		log "LAB_KEEP set: keeping $LAB for inspection"
	else
		rm -rf "${LAB:?}"/{A,B,C,shared.img,shared.loop,shared.loop.A,shared.loop.B,secret,sampler.*,fs}
	fi
	return 0
}

# ---------------------------------------------------------------------------------------------
# Observations.

vip_holder() {
	local h
	for h in A B; do
		grep -q " $VIP/" <<<"$(ip -n "$NS$h" -4 -o addr show dev lab0 2>/dev/null)" && echo "$h"
	done
}

mounted_hosts() {
	local h
	for h in A B; do
		awk -v m="$(hdir "$h")/mnt" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo &&
			echo "$h"
	done
}

is_mounted() { mounted_at "$(hdir "$1")/mnt"; }

role_of() {
	if [ "$(backend)" = tandem ]; then
		tandem "$1" status --json share 2>/dev/null |
			sed -n 's/.*"role": *"\([a-z-]*\)".*/\1/p' | head -n1
	else
		is_mounted "$1" && echo primary || echo secondary
	fi
}

# The state as one line: "vip=A mounted=A smbd=A".
cmd_state() {
	local h smb=
	for h in A B; do cmd_smbd_status "$h" && smb="$smb$h"; done
	echo "vip=$(vip_holder | tr -d '\n') mounted=$(mounted_hosts | tr -d '\n') smbd=$smb"
}

# A host serves when it holds the VIP, has the share mounted and smbd running, and nobody else
# has it mounted.
serving_only() {
	[ "$(cmd_state)" = "vip=$1 mounted=$1 smbd=$1" ]
}

wait_serving() {
	local h=$1 secs=${2:-40}
	wait_for "$secs" "$h serving alone ($(cmd_state))" serving_only "$h" ||
		fail "$h is not serving: $(cmd_state)"
	wait_for 20 "client sees the share" client_ls || fail "the client cannot list the share"
}

# ---------------------------------------------------------------------------------------------
# The client: everything through //VIP/share from namespace ${NS}C.

smbc() {
	in_ns C timeout 10 smbclient -s "$LAB/C/smb.conf" "//$VIP/share" -N "$@"
}

client_ls() { smbc -c 'ls' >/dev/null 2>&1; }

# Write a new file of `kib` KiB through the VIP; on success it is recorded as acknowledged.
cmd_put() {
	local name=$1 kib=${2:-64} f=$LAB/C/files/$1
	head -c "$((kib * 1024))" /dev/urandom >"$f"
	if smbc -c "put $f $name" >>"$LAB/C/client.log" 2>&1; then
		echo "$name $(sha256sum <"$f" | cut -d' ' -f1)" >>"$LAB/C/acked"
		return 0
	fi
	return 1
}

# Read every acknowledged file back through the VIP and compare checksums.
cmd_verify() {
	local n=0 name sum got
	rm -f "$LAB"/C/got/*
	while read -r name sum; do
		smbc -c "get $name $LAB/C/got/$name" >>"$LAB/C/client.log" 2>&1 ||
			fail "client cannot read back $name through the VIP"
		got=$(sha256sum <"$LAB/C/got/$name" | cut -d' ' -f1)
		[ "$got" = "$sum" ] || fail "$name: checksum $got, expected $sum"
		n=$((n + 1))
	done <"$LAB/C/acked"
	log "client read back $n acknowledged files through $VIP, checksums match"
}

# Sample the mount table continuously; any moment with both hosts mounted is recorded.
cmd_sampler_start() {
	rm -f "$LAB/sampler.stop" "$LAB/sampler.both"
	(
		local i=0 a b line
		while [ ! -e "$LAB/sampler.stop" ] && [ $i -lt 200000 ]; do
			a=0 b=0
			while read -r _ _ _ _ line _; do
				[ "$line" = "$LAB/A/mnt" ] && a=1
				[ "$line" = "$LAB/B/mnt" ] && b=1
			done </proc/self/mountinfo
			[ $a = 1 ] && [ $b = 1 ] && echo "$(now) both mounted" >>"$LAB/sampler.both"
			i=$((i + 1))
		done
		echo "$i" >"$LAB/sampler.count"
	) &
	echo $! >"$LAB/sampler.pid"
}

cmd_sampler_stop() {
	touch "$LAB/sampler.stop"
	local pid
	pid=$(cat "$LAB/sampler.pid" 2>/dev/null)
	if [ -n "$pid" ]; then
		wait_for 10 "sampler exit" not_alive "$pid" || kill -KILL "$pid" 2>/dev/null
	fi
	log "mount sampler took $(cat "$LAB/sampler.count" 2>/dev/null || echo '?') samples"
	if [ -s "$LAB/sampler.both" ]; then
		head -n5 "$LAB/sampler.both" >&2
		fail "both hosts had the share mounted at the same time ($(wc -l <"$LAB/sampler.both") samples)"
	fi
}

# ---------------------------------------------------------------------------------------------

main() {
	local cmd=${1:-help}
	shift || true
	case $cmd in
	up) cmd_up "$@" ;;
	down) cmd_down "$@" ;;
	boot) cmd_boot "$@" ;;
	crash) cmd_crash "$@" ;;
	carp-start) cmd_carp_start "$@" ;;
	carp-stop) cmd_carp_stop "$@" ;;
	link-down) link_set "$1" down ;;
	link-up) link_set "$1" up ;;
	partition) partition "$1" ;;
	heal) heal "$1" ;;
	state) cmd_state ;;
	put) cmd_put "$@" ;;
	verify) cmd_verify ;;
	wait-serving) wait_serving "$@" ;;
	sampler-start) cmd_sampler_start ;;
	sampler-stop) cmd_sampler_stop ;;
	smbd-start) cmd_smbd_start "$@" ;;
	smbd-stop) cmd_smbd_stop "$@" ;;
	smbd-status) cmd_smbd_status "$@" ;;
	attach) cmd_attach "$@" ;;
	detach) cmd_detach "$@" ;;
	carp-event) cmd_carp_event "$@" ;;
	vrrp-event) cmd_vrrp_event "$@" ;;
	scenario)
		# shellcheck source=scenarios.sh
		source "$HERE/scenarios.sh"
		run_scenario "$@"
		;;
	help | -h | --help) sed -n '2,20p' "$0" ;;
	*) fail "unknown command $cmd (try help)" ;;
	esac
}

# Sourced by scenarios.sh and baseline-switch for the functions; executed for the commands.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	main "$@"
fi
