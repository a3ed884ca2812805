#!/bin/bash
# The Pacemaker lab: two cluster nodes (node1, node2) and a quorum-device host (qn), each in
# its own mount + UTS + net + pid namespaces (shared/notes/pacemaker-lab.md), joined by a
# bridge in namespace tocf-sw. Corosync 3 (knet, aes256/sha256, token 1000), qdevice
# ffsplit against corosync-qnetd on qn, Pacemaker 2.1 with crmsh, and on each node a tandem
# daemon whose resource r0 is a promotable clone of ocf:tandem:tandem, colocated with and
# ordered before an ocf:heartbeat:Filesystem mount and a small service.
#
#   lab.sh up            build everything, cluster running, resources placed
#   lab.sh run           up + the scenarios (cold, partition, crash, return, partition
#                        again with the primary on the other node, a planned
#                        switchover, the primary's disk fails and the node is
#                        rebuilt) + down
#   lab.sh down          tear down (node inits killed by PID, loop devices, netns, files)
#   lab.sh in NODE CMD…  run a command inside a node
#   lab.sh crash NODE | boot NODE [new-disk] | partition | heal | state
#
# Addresses 198.18.0.11 (node1), .12 (node2), .13 (qn), only inside the namespaces; the lab
# refuses to start when the root namespace uses 198.18.0.0/24.
# Environment: TOCF_LAB (default /tmp/tocf), TANDEM (the binary; default target/release/tandem),
# TOCF_RESULTS (copy the timings there), TOCF_HEURISTICS (qdevice heuristics mode, default
# sync; `off` shows what they prevent: a primary on node2 loses the vote in a partition).

set -u
set -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LAB=${TOCF_LAB:-/tmp/tocf}
TANDEM=${TANDEM:-$ROOT/target/release/tandem}
NET=198.18.0
SW=tocf-sw
NODES=(node1 node2 qn)
declare -A IP=([node1]=$NET.11 [node2]=$NET.12 [qn]=$NET.13)
declare -A PEER=([node1]=node2 [node2]=node1)
DISK_MB=${TOCF_DISK_MB:-256}
SELF=$HERE/lab.sh
# The daemons' hooks call this script inside the nodes: they need the same lab.
export TOCF_LAB=$LAB TANDEM

T0=$(date +%s.%N)
log() { printf '%s pcmk-lab: %s\n' "$(date +%H:%M:%S.%2N)" "$*" >&2; }
fail() {
	log "FAIL: $*"
	if [ -d "$LAB" ]; then
		cmd_state >&2 2>&1 || true
	fi
	exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# Poll `cmd` every 0.2 s until it succeeds, for at most `secs` seconds (and 5 polls a second).
wait_for() {
	local secs=$1 what=$2
	shift 2
	local i n=$((secs * 5)) end=$((SECONDS + secs))
	for ((i = 0; i < n && SECONDS < end; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	log "timed out after ${secs}s waiting for: $what"
	return 1
}

init_pid() { cat "$LAB/$1/init.pid" 2>/dev/null; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Run a command inside a node (all its namespaces; / as working directory).
in_node() {
	local n=$1 pid
	shift
	pid=$(init_pid "$n")
	alive "$pid" || return 125
	nsenter -t "$pid" -m -u -n -p --wd=/ -- "$@"
}

# Start a daemon inside a node; it is reparented to the node's init (setsid -f).
spawn() {
	local n=$1 logf=$2
	shift 2
	in_node "$n" env PATH="$LAB/bin:$PATH" setsid -f "$@" </dev/null >>"$LAB/$n/log/$logf" 2>&1
}

tandem_in() {
	local n=$1
	shift
	in_node "$n" "$TANDEM" -c "$LAB/here/tandem.toml" "$@"
}

# ---------------------------------------------------------------------------------------------

preflight() {
	[ "$(id -u)" = 0 ] || fail "the lab needs root (namespaces, mounts, loop devices)"
	local t
	for t in unshare nsenter corosync corosync-qnetd corosync-qdevice pacemakerd crm crm_mon \
		cibadmin crm_resource modprobe nbdfuse losetup mkfs.ext4 sha256sum; do
		command -v "$t" >/dev/null || fail "missing tool: $t"
	done
	[ -x "$TANDEM" ] || fail "no tandem binary at $TANDEM (cargo build --release, or set TANDEM)"
	if grep -q " $NET\." <<<"$(ip -4 -o addr show)"; then
		fail "the root namespace has an address in $NET.0/24: refusing to build the lab"
	fi
	if grep -q "^$NET\." <<<"$(ip -4 route show)"; then
		fail "the root namespace routes $NET.0/24: refusing to build the lab"
	fi
	[ -e "/run/netns/$SW" ] && fail "namespace $SW exists: another lab runs (or run lab.sh down)"
	return 0
}

write_files() {
	local n d
	mkdir -p "$LAB/here" "$LAB/bin"
	ln -sfn "$TANDEM" "$LAB/bin/tandem"
	# The resource agent directory every node sees: the installed agents plus ours.
	cp -a /usr/lib/ocf/resource.d "$LAB/ocf-rd"
	mkdir -p "$LAB/ocf-rd/tandem"
	cp "$ROOT/ocf/tandem" "$LAB/ocf-rd/tandem/tandem"
	head -c 256 /dev/urandom >"$LAB/authkey"
	head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$LAB/secret"
	chmod 600 "$LAB/secret"
	cat >"$LAB/svc.sh" <<EOF
#!/bin/sh
# The lab's service: appends a line to the replicated filesystem every half second.
while :; do date +%s.%N >>"$LAB/here/mnt/svc.log"; sleep 0.5; done
EOF
	chmod 755 "$LAB/svc.sh"
	cat >"$LAB/is-primary" <<EOF
#!/bin/sh
# qdevice heuristics: pass (exit 0) on the node where tandem resource r0 is primary.
"$TANDEM" -c "$LAB/here/tandem.toml" status --json r0 2>/dev/null | grep -q '"role":"primary"'
EOF
	chmod 755 "$LAB/is-primary"
	for n in "${NODES[@]}"; do
		d=$LAB/$n
		mkdir -p "$d"/{log,mnt,fuse} "$d/root/etc" "$d/root/var/lib" "$d/root/var/log"
		cp -a /etc/corosync "$d/root/etc/"
		cp -a /var/lib/pacemaker /var/lib/corosync "$d/root/var/lib/"
		cp -a /var/log/pacemaker /var/log/corosync "$d/root/var/log/"
		rm -f "$d"/root/var/lib/pacemaker/cib/* "$d"/root/var/log/pacemaker/*.log
		# A CIB on disk with dc-deadtime=5s, as a cluster that was set up before has: the
		# first election then waits 5 s instead of the default 20 s (no signature file:
		# Pacemaker accepts an unsigned CIB and signs it on its first write).
		rm -f "$LAB/cib.xml"
		CIB_file=$LAB/cib.xml cibadmin --empty >"$LAB/cib.xml" &&
			CIB_file=$LAB/cib.xml crm_attribute --type crm_config --name dc-deadtime \
				--update 5s || fail "cannot make the initial CIB"
		install -o hacluster -g haclient -m 600 "$LAB/cib.xml" "$d/root/var/lib/pacemaker/cib/cib.xml"
		install -m 400 "$LAB/authkey" "$d/root/etc/corosync/authkey"
		cat >"$d/root/etc/corosync/corosync.conf" <<EOF
totem {
	version: 2
	cluster_name: tocf
	transport: knet
	crypto_cipher: aes256
	crypto_hash: sha256
	token: 1000
}
nodelist {
	node {
		name: node1
		nodeid: 1
		ring0_addr: ${IP[node1]}
	}
	node {
		name: node2
		nodeid: 2
		ring0_addr: ${IP[node2]}
	}
}
quorum {
	provider: corosync_votequorum
	device {
		votes: 1
		model: net
		net {
			host: ${IP[qn]}
			algorithm: ffsplit
			tls: off
		}
		# The vote of a 1:1 split goes to the side whose heuristics pass: the side of
		# the tandem primary, so the primary keeps running and nothing diverges.
		heuristics {
			mode: ${TOCF_HEURISTICS:-sync}
			exec_primary: $LAB/is-primary
		}
	}
}
logging {
	to_logfile: yes
	logfile: /var/log/corosync/corosync.log
	to_syslog: no
	to_stderr: no
	timestamp: on
}
EOF
	done
	for n in node1 node2; do
		cat >"$LAB/$n/tandem.toml" <<EOF
# Lab node $n (tests/pacemaker/lab.sh). Paths are the same on both nodes: each node sees
# its own directory at $LAB/here.
node = "$n"

[log]
tag = "tandem-$n"
level = "info"

[switch]
lock = "$LAB/here/switch.lock"
role_timeout = "15s"
device_timeout = "15s"

[daemon]
listen = ["${IP[$n]}:7788"]
control = "$LAB/here/control.sock"
secret = "$LAB/secret"
timeout = "2s"
# The fencing hook: the agent file places/lifts the constraint on disconnect/syncdone.
exec = "/usr/lib/ocf/resource.d/tandem/tandem"

# No mountpoint: Pacemaker mounts the device (ocf:heartbeat:Filesystem) and runs the
# service; the agent's promote makes the device (attach hook: NBD export -> loop device).
[resource.r0]
backend = "tandem"
device = "$LAB/here/dev"
nbd = "$LAB/here/r0.nbd"
extent_size = "512K"
attach = "$HERE/lab.sh attach"
detach = "$HERE/lab.sh detach"

[resource.r0.on.node1]
local = "$LAB/here/disk.img"
remote = "${IP[node2]}:7788"

[resource.r0.on.node2]
local = "$LAB/here/disk.img"
remote = "${IP[node1]}:7788"
EOF
		truncate -s "${DISK_MB}M" "$LAB/$n/disk.img"
	done
	cat >"$LAB/cluster.crm" <<EOF
property cib-bootstrap-options: stonith-enabled=false dc-deadtime=5s no-quorum-policy=stop
rsc_defaults resource-stickiness=100
primitive tandem-r0 ocf:tandem:tandem \\
	params resource=r0 config=$LAB/here/tandem.toml binary=$TANDEM \\
	op start timeout=60s interval=0 \\
	op stop timeout=120s interval=0 \\
	op promote timeout=120s interval=0 \\
	op demote timeout=120s interval=0 \\
	op notify timeout=30s interval=0 \\
	op monitor interval=3s timeout=30s role=Promoted OCF_CHECK_LEVEL=10 \\
	op monitor interval=4s timeout=30s role=Unpromoted
clone tandem-r0-clone tandem-r0 \\
	meta promotable=true promoted-max=1 promoted-node-max=1 clone-max=2 clone-node-max=1 notify=true
primitive fs-r0 Filesystem \\
	params device=$LAB/here/dev directory=$LAB/here/mnt fstype=ext4 options=noatime \\
	op start timeout=60s interval=0 op stop timeout=60s interval=0 \\
	op monitor interval=10s timeout=40s
primitive svc-r0 anything \\
	params binfile=$LAB/svc.sh \\
	op monitor interval=10s timeout=20s
group g-r0 fs-r0 svc-r0
colocation c-r0-on-promoted inf: g-r0 tandem-r0-clone:Promoted
order o-r0-after-promote Mandatory: tandem-r0-clone:promote g-r0:start
EOF
}

# Namespaces of a node, its link on the bridge, its address.
node_up() {
	local n=$1 pid
	rm -f "$LAB/$n/ready"
	setsid unshare --mount --uts --net --pid --fork --mount-proc --propagation private \
		bash "$HERE/node-init" "$n" "$LAB" </dev/null >>"$LAB/$n/log/init.log" 2>&1 &
	local upid=$!
	wait_for 10 "$n init ready" test -e "$LAB/$n/ready" || fail "$n did not come up"
	# The node's PID 1 is unshare's child (the bash running node-init).
	pid=$(pgrep -P "$upid" -x bash | head -n1)
	[ -n "$pid" ] || fail "no init pid for $n"
	echo "$pid" >"$LAB/$n/init.pid"
	echo "$upid" >"$LAB/$n/unshare.pid"
	ip -n "$SW" link add "v-$n" type veth peer name eth0 netns "$pid" || fail "veth for $n"
	ip -n "$SW" link set "v-$n" master br0 up
	in_node "$n" ip addr add "${IP[$n]}/24" dev eth0
	in_node "$n" ip link set eth0 up
}

start_tandem() {
	local n=$1
	rm -f "$LAB/$n/control.sock"
	spawn "$n" daemon.log "$TANDEM" -c "$LAB/here/tandem.toml" daemon
	wait_for 10 "tandem daemon on $n" test -S "$LAB/$n/control.sock" || fail "tandem daemon on $n"
}

start_cluster_stack() {
	local n=$1
	spawn "$n" corosync.out corosync -f
	wait_for 10 "corosync on $n" in_node "$n" corosync-cfgtool -s || fail "corosync on $n"
	spawn "$n" qdevice.out corosync-qdevice -f
	spawn "$n" pacemaker.out env PCMK_logfile=/var/log/pacemaker/pacemaker.log \
		PCMK_logfacility=none pacemakerd
}

crm_out() { in_node "${1:-node1}" crm_mon -1 2>/dev/null; }
online_both() { crm_out "$1" | grep -q "Online: \[ node1 node2 \]"; }

# The node that Pacemaker reports promoted (crm_resource --locate), if one.
promoted_by_crm() {
	in_node "$1" crm_resource --locate -r tandem-r0-clone 2>/dev/null |
		sed -n 's/.*running on: \([a-z0-9]*\) \(Promoted\|Master\).*/\1/p' | head -n1
}

# "ROLE STATE" of node $1 from one status call (two calls can straddle a role change).
role_state_of() {
	tandem_in "$1" status --json r0 2>/dev/null |
		sed -n 's/.*"role":"\([a-z]*\)".*"state":"\([a-z/-]*\)".*/\1 \2/p' | head -n1
}

role_of() {
	local rs
	rs=$(role_state_of "$1")
	echo "${rs% *}"
}

state_of() {
	local rs
	rs=$(role_state_of "$1")
	echo "${rs#* }"
}

mounted_in() { in_node "$1" awk -v m="$LAB/here/mnt" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# node serving: Pacemaker says promoted there, tandem role primary, filesystem mounted.
serving() {
	[ "$(promoted_by_crm "$1")" = "$1" ] && [ "$(role_of "$1")" = primary ] && mounted_in "$1"
}

# How many times the daemon on node $1 has left role primary (its log survives crashes and
# boots). Outside the planned switchover the lab never asks for a demote, so a new line in a
# scenario that checks it means Pacemaker moved the promotion away from a serving primary.
demotions() { grep -c "r0: role primary -> " "$LAB/$1/log/daemon.log"; }

# Fail if primary $1 left its role since demotions() said $2.
assert_not_demoted() {
	local n=$1 before=$2 now
	now=$(demotions "$n")
	[ "$now" = "$before" ] && return 0
	fail "$n was demoted while it served ($((now - before)) times; Pacemaker moved the promotion): $(grep "r0: role primary -> " "$LAB/$n/log/daemon.log" | tail -n1)"
}

# The promotion score of node $2 as node $1's partition sees it (0 when it has none).
score_of() {
	local v
	v=$(in_node "$1" crm_attribute --promotion=tandem-r0 --lifetime reboot --node "$2" --query --quiet 2>/dev/null)
	case $v in
	'' | *[!0-9]*) echo 0 ;;
	*) echo "$v" ;;
	esac
}

fence_constraint() {
	in_node "$1" cibadmin --query --xpath "//rsc_location[@id='tandem-fence-r0']" >/dev/null 2>&1
}

cmd_state() {
	local n
	for n in node1 node2; do
		if alive "$(init_pid "$n")"; then
			echo "== $n: role=$(role_of "$n") state=$(state_of "$n") mounted=$(mounted_in "$n" && echo yes || echo no)"
		else
			echo "== $n: down"
		fi
	done
	for n in node1 node2; do
		alive "$(init_pid "$n")" && crm_out "$n" && break
	done
	return 0
}

# ---------------------------------------------------------------------------------------------
# Device hooks of r0 (the daemon's attach/detach, run inside the node): the NBD export becomes
# a file through nbdfuse, then a loop device ($TANDEM_DEVICE links to it). The loop device's
# name is kept in the node's directory so that teardown can free it after a crash.

cmd_attach() {
	local d=$LAB/here sock=${TANDEM_NBD:-$LAB/here/r0.nbd} dev=${TANDEM_DEVICE:-$LAB/here/dev}
	if [ -L "$dev" ] && [ -b "$dev" ]; then return 0; fi
	if awk -v m="$d/fuse" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; then
		umount -l "$d/fuse"
	fi
	rm -f "$d/fuse.pid"
	setsid nbdfuse -P "$d/fuse.pid" "$d/fuse/nbd" --unix "$sock" </dev/null >>"$d/log/nbdfuse.log" 2>&1 &
	wait_for 10 "nbdfuse" test -s "$d/fuse.pid" || exit 1
	local loop
	loop=$(losetup --find --show "$d/fuse/nbd") || exit 1
	echo "$loop" >>"$d/loops"
	ln -sfn "$loop" "$dev"
}

cmd_detach() {
	local d=$LAB/here dev=${TANDEM_DEVICE:-$LAB/here/dev} loop pid
	if [ -L "$dev" ]; then
		loop=$(readlink "$dev")
		rm -f "$dev"
		# Freed here: off the list, so that teardown never frees that name again (by then
		# another test may have it).
		if [ -b "$loop" ] && losetup -d "$loop" 2>/dev/null && [ -f "$d/loops" ]; then
			grep -vx -- "$loop" "$d/loops" >"$d/loops.new"
			mv -f "$d/loops.new" "$d/loops"
		fi
	fi
	pid=$(cat "$d/fuse.pid" 2>/dev/null)
	fusermount3 -u "$d/fuse" 2>/dev/null || umount -l "$d/fuse" 2>/dev/null
	if alive "$pid"; then
		kill "$pid" 2>/dev/null
		wait_for 5 "nbdfuse exit" sh -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null
	fi
	rm -f "$d/fuse.pid"
	return 0
}

# Loop devices a dead node left behind (their nbdfuse died with it). The list holds only loop
# devices the node attached and never freed, so they are still ours. Their backing file was
# in the node's FUSE mount, which went with the node's mount namespace: the kernel now names
# it by its path inside that mount, "/nbd" (which is why a match on the full path missed
# them, and every run that killed a node left two loop devices behind).
free_loops() {
	local n=$1 loop back
	[ -f "$LAB/$n/loops" ] || return 0
	while read -r loop; do
		[ -b "$loop" ] || continue
		back=$(losetup -l -n -O BACK-FILE "$loop" 2>/dev/null)
		case "$back" in
		"$LAB/here/fuse/nbd" | /nbd) losetup -d "$loop" 2>/dev/null ;;
		esac
	done <"$LAB/$n/loops"
	rm -f "$LAB/$n/loops"
}

# ---------------------------------------------------------------------------------------------

cmd_up() {
	cmd_down quiet
	preflight
	mkdir -p "$LAB"
	log "building the lab in $LAB (tandem $TANDEM)"
	write_files
	ip netns add "$SW" || fail "ip netns add $SW"
	ip -n "$SW" link add br0 type bridge
	ip -n "$SW" link set br0 up
	ip -n "$SW" link set lo up
	local n
	for n in "${NODES[@]}"; do node_up "$n"; done
	# The replicated disk, before the cluster: metadata, a first primary makes the filesystem,
	# the initial sync, then both back to role init for Pacemaker (DRBD's procedure too).
	for n in node1 node2; do
		tandem_in "$n" create r0 >>"$LAB/$n/log/daemon.log" 2>&1 || fail "tandem create on $n"
		start_tandem "$n"
	done
	tandem_in node2 role secondary r0 || fail "role secondary on node2"
	tandem_in node1 role primary r0 || fail "role primary on node1"
	wait_for 10 "NBD export on node1" test -S "$LAB/node1/r0.nbd" || fail "no export"
	in_node node1 env TANDEM_NBD="$LAB/here/r0.nbd" TANDEM_DEVICE="$LAB/here/dev" \
		"$HERE/lab.sh" attach || fail "attach on node1"
	in_node node1 mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LAB/here/dev" ||
		fail "mkfs"
	in_node node1 "$HERE/lab.sh" detach
	local t
	t=$(now)
	tandem_in node1 wait-sync r0 --timeout 120s || fail "initial sync did not complete"
	log "initial sync of ${DISK_MB} MiB done in $(elapsed "$t") s"
	echo "initial_sync_s=$(elapsed "$t")" >>"$LAB/timings"
	tandem_in node1 role init r0 || fail "role init on node1"
	tandem_in node2 role init r0 || fail "role init on node2"
	spawn qn qnetd.out corosync-qnetd -f -s off
	wait_for 10 "qnetd listening" in_node qn sh -c "ss -ltn | grep -q ':5403 '" || fail "qnetd"
	t=$(now)
	for n in node1 node2; do start_cluster_stack "$n"; done
	wait_for 60 "both nodes online" online_both node1 || fail "cluster did not form"
	log "cluster online in $(elapsed "$t") s"
	echo "cluster_online_s=$(elapsed "$t")" >>"$LAB/timings"
	in_node node1 env PATH="$LAB/bin:$PATH" crm configure load update "$LAB/cluster.crm" >>"$LAB/node1/log/crm.log" 2>&1 ||
		fail "crm configure load: $(tail -n5 "$LAB/node1/log/crm.log")"
	log "lab is up"
}

# Boot node $1 (after a crash); with `new-disk`, on a new, empty disk that gets fresh
# metadata before the daemon starts (an operator's disk replacement).
cmd_boot() {
	local n=$1 disk=${2:-}
	# A rebooted machine has no block device from before: its loop devices (over the FUSE
	# mount that died with the node) go, and so does the link to them. A link left behind
	# made the attach hook take the dead device for attached, and a promote's mount failed.
	free_loops "$n"
	rm -f "$LAB/$n/dev"
	if [ "$disk" = new-disk ]; then
		rm -f "$LAB/$n/disk.img"
		truncate -s "${DISK_MB}M" "$LAB/$n/disk.img"
	fi
	node_up "$n"
	if [ "$disk" = new-disk ]; then
		tandem_in "$n" create r0 >>"$LAB/$n/log/daemon.log" 2>&1 || fail "tandem create on $n's new disk"
	fi
	start_tandem "$n"
	start_cluster_stack "$n"
}

# A crash / power cut: the node's init is killed, and with it every process of its pid
# namespace; its netns, /run and mounts go with it. What it leaves: its disk and dirs.
cmd_crash() {
	local n=$1 pid upid
	pid=$(init_pid "$n")
	upid=$(cat "$LAB/$n/unshare.pid" 2>/dev/null)
	kill -KILL "$pid" 2>/dev/null
	wait_for 10 "$n's init gone" sh -c "! kill -0 $pid" || fail "$n's init survived SIGKILL"
	[ -n "$upid" ] && wait_for 10 "unshare of $n gone" sh -c "! kill -0 $upid"
	rm -f "$LAB/$n/init.pid" "$LAB/$n/unshare.pid" "$LAB/$n/control.sock"
}

# Partition: each cluster node blackholes the other (qn stays reachable from both).
cmd_partition() {
	in_node node1 ip route add blackhole "${IP[node2]}/32"
	in_node node2 ip route add blackhole "${IP[node1]}/32"
}

cmd_heal() {
	in_node node1 ip route del blackhole "${IP[node2]}/32"
	in_node node2 ip route del blackhole "${IP[node1]}/32"
}

cmd_down() {
	local quiet=${1:-} n pid i
	[ -d "$LAB" ] || [ -e "/run/netns/$SW" ] || return 0
	[ -z "$quiet" ] && log "tearing the lab down"
	for n in "${NODES[@]}"; do
		pid=$(init_pid "$n")
		alive "$pid" && kill -KILL "$pid" 2>/dev/null
	done
	for n in "${NODES[@]}"; do
		pid=$(init_pid "$n")
		for ((i = 0; i < 50; i++)); do
			alive "$pid" || break
			sleep 0.1
		done
		pid=$(cat "$LAB/$n/unshare.pid" 2>/dev/null)
		for ((i = 0; i < 50; i++)); do
			alive "$pid" || break
			sleep 0.1
		done
	done
	# A dead node's FUSE mount is gone with its mount namespace; the loop devices remain.
	for ((i = 0; i < 20; i++)); do
		local busy=0
		for n in node1 node2; do
			[ -f "$LAB/$n/loops" ] && busy=1 && free_loops "$n"
		done
		[ $busy = 0 ] && break
		sleep 0.2
	done
	[ -e "/run/netns/$SW" ] && ip netns del "$SW"
	if [ -n "${TOCF_KEEP:-}" ]; then
		log "TOCF_KEEP set: keeping $LAB"
	else
		rm -rf "${LAB:?}"
	fi
	return 0
}

# ---------------------------------------------------------------------------------------------
# Client: writes through the promoted node's filesystem, fsynced (acknowledged), recorded with
# its checksum; check reads every recorded file on a node.

cmd_put() {
	local n=$1 name=$2 mb=$3 f
	f=$LAB/files/$name
	mkdir -p "$LAB/files"
	head -c "$((mb << 20))" /dev/urandom >"$f"
	in_node "$n" dd if="$f" of="$LAB/here/mnt/$name" bs=1M conv=fsync status=none ||
		return 1
	echo "$name $(sha256sum <"$f" | cut -d' ' -f1)" >>"$LAB/acked"
}

cmd_check() {
	local n=$1 name sum got k=0
	while read -r name sum; do
		got=$(in_node "$n" sha256sum "$LAB/here/mnt/$name" | cut -d' ' -f1)
		[ "$got" = "$sum" ] || fail "$n: $name has checksum ${got:-none}, acknowledged $sum"
		k=$((k + 1))
	done <"$LAB/acked"
	log "$n: all $k acknowledged files read back with their checksums"
}

# Sample both nodes continuously: a moment with two tandem primaries, two Pacemaker
# promoted instances or two mounts, a primary serving from its own disk outranked by the other
# node's promotion score, or any split-brain state, is recorded.
cmd_sampler_start() {
	rm -f "$LAB/sampler.stop" "$LAB/sampler.bad"
	(
		i=0
		while [ ! -e "$LAB/sampler.stop" ] && [ $i -lt 3000 ]; do
			declare -A rs=([node1]="$(role_state_of node1)" [node2]="$(role_state_of node2)")
			[ "${rs[node1]% *}" = primary ] && [ "${rs[node2]% *}" = primary ] &&
				echo "$(now) two primaries" >>"$LAB/sampler.bad"
			if mounted_in node1 2>/dev/null && mounted_in node2 2>/dev/null; then
				echo "$(now) mounted on both" >>"$LAB/sampler.bad"
			fi
			for n in node1 node2; do
				[ "${rs[$n]#* }" = split-brain ] && echo "$(now) split-brain on $n" >>"$LAB/sampler.bad"
				# A primary serving from its own disk must never be outranked: a higher
				# score elsewhere makes Pacemaker demote it to promote the other copy. (A
				# diskless primary, serving from the peer, is meant to be outranked.)
				[ "${rs[$n]% *}" = primary ] && [ "${rs[$n]#* }" != diskless ] || continue
				mine=$(score_of "$n" "$n")
				other=$(score_of "$n" "${PEER[$n]}")
				[ "$other" -gt "$mine" ] &&
					echo "$(now) $n is primary with promotion score $mine, below ${PEER[$n]}'s $other" >>"$LAB/sampler.bad"
			done
			c1=$(promoted_by_crm node1)
			c2=$(promoted_by_crm node2)
			if [ -n "$c1" ] && [ -n "$c2" ] && [ "$c1" != "$c2" ]; then
				echo "$(now) promoted on $c1 (node1's view) and $c2 (node2's view)" >>"$LAB/sampler.bad"
			fi
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
	[ -n "$pid" ] && { wait_for 30 "sampler exit" sh -c "! kill -0 $pid" || kill -9 "$pid"; }
	log "sampler took $(cat "$LAB/sampler.count" 2>/dev/null || echo '?') samples of both nodes"
	if [ -s "$LAB/sampler.bad" ]; then
		head -n5 "$LAB/sampler.bad" >&2
		fail "unsafe state observed ($(wc -l <"$LAB/sampler.bad") samples)"
	fi
}

json_num() { sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" <<<"$1" | head -n1; }

timing() {
	log "timing: $1 = $2 s"
	echo "$1=$2" >>"$LAB/timings"
}

# ---------------------------------------------------------------------------------------------
# Scenarios (each continues from the previous one's state).

# The scenarios run in order, each from the state the previous one left. $LAB/primary names
# the node that is primary: whichever Pacemaker picked at the cold start, then the survivor.

primary() { cat "$LAB/primary"; }
secondary() { echo "${PEER[$(primary)]}"; }

scenario_cold() {
	log "== cold start: one node promoted, sync complete, a client writes"
	local t p
	t=$(now)
	wait_for 60 "a node serving" sh -c "$SELF serving node1 || $SELF serving node2" ||
		fail "no node promoted and serving"
	timing cold_promoted_after_config_s "$(elapsed "$t")"
	if serving node1; then p=node1; else p=node2; fi
	echo "$p" >"$LAB/primary"
	log "Pacemaker promoted $p"
	[ "$(role_of "${PEER[$p]}")" = secondary ] || fail "${PEER[$p]} is not secondary"
	wait_for 30 "both complete" sh -c "[ \"\$($SELF state-of node1)\" = complete ] && [ \"\$($SELF state-of node2)\" = complete ]" ||
		fail "the pair is not in sync"
	wait_for 30 "svc-r0 writing" in_node "$p" test -s "$LAB/here/mnt/svc.log" ||
		fail "the service does not run on the promoted node"
	cmd_put "$p" cold1 4 || fail "client write on $p"
	cmd_check "$p"
}

# Partition (N: 1 or 2): the secondary has no quorum (the qdevice heuristics give the vote
# to the primary's side, whatever its node id) and stops; the primary stays promoted and
# fences the secondary off; nothing diverges.
scenario_partition() {
	local k=$1 p s t v d
	p=$(primary)
	s=$(secondary)
	log "== partition $k, primary on $p: $s (no quorum) stops, $p stays promoted"
	d=$(demotions "$p")
	cmd_sampler_start
	cmd_partition
	t=$(now)
	wait_for 30 "$s stopped (no quorum)" sh -c "[ \"\$($SELF role-of $s)\" = init ]" ||
		fail "$s did not stop without quorum"
	timing "partition${k}_secondary_stopped_s" "$(elapsed "$t")"
	wait_for 20 "fence constraint placed" fence_constraint "$p" ||
		fail "$p did not place the fencing constraint"
	timing "partition${k}_fence_placed_s" "$(elapsed "$t")"
	serving "$p" || fail "$p stopped serving in the partition"
	in_node "$p" corosync-quorumtool -s | grep -q "Quorate:.*Yes" || fail "$p is not quorate"
	if in_node "$s" corosync-quorumtool -s | grep -q "Quorate:.*Yes"; then
		fail "$s is quorate in the partition"
	fi
	cmd_put "$p" "part$k" 4 || fail "client write on $p during the partition"
	cmd_heal
	t=$(now)
	wait_for 60 "$s back as secondary, in sync" sh -c "[ \"\$($SELF role-of $s)\" = secondary ] && [ \"\$($SELF state-of $p)\" = complete ]" ||
		fail "$s did not resync after the heal"
	timing "partition${k}_heal_to_in_sync_s" "$(elapsed "$t")"
	wait_for 20 "fence constraint lifted" sh -c "! $SELF in $p cibadmin --query --xpath \"//rsc_location[@id='tandem-fence-r0']\"" ||
		fail "the fencing constraint stayed after syncdone"
	# Settled: no switch back, no late second primary.
	sleep 5
	cmd_sampler_stop
	assert_not_demoted "$p" "$d"
	serving "$p" || fail "$p is not serving after the heal"
	v=$(tandem_in "$p" verify r0 --json) || fail "tandem verify failed: $v"
	grep -q '"differing":\[\]' <<<"$v" || fail "verify found differences: $v"
	log "verify: no difference ($v)"
	cmd_check "$p"
}

scenario_crash() {
	local p s t
	p=$(primary)
	s=$(secondary)
	log "== crash of the promoted $p: $s promoted with every acknowledged write"
	cmd_put "$p" crash1 4 || fail "client write before the crash"
	cmd_sampler_start
	t=$(now)
	cmd_crash "$p"
	wait_for 60 "$s promoted" sh -c "[ \"\$($SELF promoted-by $s)\" = $s ]" ||
		fail "$s was not promoted"
	timing crash_to_promoted_reported_s "$(elapsed "$t")"
	wait_for 60 "$s serving" serving "$s" || fail "$s does not serve"
	timing crash_to_mounted_s "$(elapsed "$t")"
	cmd_sampler_stop
	echo "$s" >"$LAB/primary"
	cmd_check "$s"
	wait_for 20 "fence constraint placed by $s" fence_constraint "$s" ||
		fail "$s (primary, peer gone) did not place the fencing constraint"
	cmd_put "$s" after1 8 || fail "client write on $s"
}

scenario_return() {
	local p s t st total resynced v d
	p=$(primary)
	s=$(secondary)
	log "== $s returns: resyncs only the dirty extents, stays unpromoted"
	d=$(demotions "$p")
	t=$(now)
	cmd_boot "$s"
	cmd_sampler_start
	wait_for 90 "$s in sync" sh -c "[ \"\$($SELF role-of $s)\" = secondary ] && [ \"\$($SELF state-of $s)\" = complete ]" ||
		fail "$s did not resync"
	timing return_boot_to_in_sync_s "$(elapsed "$t")"
	st=$(tandem_in "$s" status --json r0)
	total=$(json_num "$st" data_size)
	resynced=$(json_num "$st" bytes_resynced)
	log "$s resynced $resynced of $total bytes"
	echo "return_resynced_bytes=$resynced" >>"$LAB/timings"
	echo "data_size_bytes=$total" >>"$LAB/timings"
	[ -n "$resynced" ] && [ "$resynced" -ge $((8 << 20)) ] ||
		fail "$s resynced $resynced bytes, less than the 8 MiB written while it was away"
	[ "$resynced" -lt $((total / 4)) ] || fail "$s resynced $resynced of $total bytes: not only the dirty extents"
	wait_for 20 "fence constraint lifted" sh -c "! $SELF in $p cibadmin --query --xpath \"//rsc_location[@id='tandem-fence-r0']\"" ||
		fail "$p's fencing constraint stayed after the resync"
	# Settled: the returning node does not take the promotion back.
	sleep 5
	cmd_sampler_stop
	assert_not_demoted "$p" "$d"
	serving "$p" || fail "$p stopped serving when $s returned"
	[ "$(role_of "$s")" = secondary ] || fail "$s is $(role_of "$s") after its return"
	v=$(tandem_in "$p" verify r0 --json) || fail "tandem verify failed: $v"
	grep -q '"differing":\[\]' <<<"$v" || fail "verify found differences: $v"
	cmd_check "$p"
}

# A planned switchover, as an administrator does it (`crm_resource --move --promoted`): the
# primary is demoted, the secondary promoted with every acknowledged write, the old primary
# reconnects as secondary in sync, and nobody is fenced off. After `--clear` the promotion stays
# where it is (the serving primary outranks the returning one).
scenario_switchover() {
	local p s t d v
	p=$(primary)
	s=$(secondary)
	log "== planned switchover from $p to $s (crm_resource --move --promoted)"
	cmd_put "$p" move1 4 || fail "client write on $p before the switchover"
	cmd_sampler_start
	t=$(now)
	in_node "$p" crm_resource --move -r tandem-r0-clone --promoted -N "$s" >/dev/null 2>&1 ||
		fail "crm_resource --move to $s"
	wait_for 60 "$s serving" serving "$s" || fail "$s was not promoted by the move"
	timing switchover_to_serving_s "$(elapsed "$t")"
	wait_for 30 "$p back as secondary, in sync" sh -c "[ \"\$($SELF role-of $p)\" = secondary ] && [ \"\$($SELF state-of $s)\" = complete ]" ||
		fail "$p did not reconnect as secondary in sync after the switchover"
	timing switchover_to_in_sync_s "$(elapsed "$t")"
	echo "$s" >"$LAB/primary"
	serving "$p" && fail "$p still serves after the switchover"
	fence_constraint "$s" && fail "a fencing constraint was placed in a planned switchover"
	cmd_check "$s"
	cmd_put "$s" move2 4 || fail "client write on $s after the switchover"
	d=$(demotions "$s")
	in_node "$s" crm_resource --clear -r tandem-r0-clone >/dev/null 2>&1 ||
		fail "crm_resource --clear"
	# Settled: the move's constraint is gone, and the promotion does not go back.
	sleep 5
	cmd_sampler_stop
	assert_not_demoted "$s" "$d"
	serving "$s" || fail "$s stopped serving after crm_resource --clear"
	fence_constraint "$s" && fail "a fencing constraint is left after the switchover"
	v=$(tandem_in "$s" verify r0 --json) || fail "tandem verify failed: $v"
	grep -q '"differing":\[\]' <<<"$v" || fail "verify found differences after the switchover: $v"
	cmd_check "$s"
}

# The primary's disk fails (EIO on every read and write of its data): it goes diskless and
# serves from the peer, which holds every write; its promotion score (1000) falls below the
# peer's (10000), so Pacemaker moves the promotion to the copy with a disk. The failed node is
# then rebuilt as an operator would (new disk, `tandem create`, boot) and resyncs in full.
# Needs a tandem built with `--features faults` (CI's) for the EIO; skipped without.
scenario_disk_failure() {
	local p s t size v st
	p=$(primary)
	s=$(secondary)
	log "== the disk of the promoted $p fails: Pacemaker moves the promotion to $s"
	if ! tandem_in "$p" fault --help >/dev/null 2>&1; then
		log "skipped: $TANDEM has no \`fault\` command (build it with --features faults)"
		return 0
	fi
	cmd_put "$p" disk1 4 || fail "client write on $p before its disk fails"
	size=$(json_num "$(tandem_in "$p" status --json r0)" data_size)
	[ -n "$size" ] || fail "no data_size in $p's status"
	cmd_sampler_start
	t=$(now)
	tandem_in "$p" fault r0 eio rw 0 "$size" >/dev/null || fail "EIO injection on $p"
	wait_for 60 "$s serving" serving "$s" ||
		fail "Pacemaker did not move the promotion from the diskless $p to $s"
	timing disk_failure_to_moved_s "$(elapsed "$t")"
	sleep 3
	cmd_sampler_stop
	echo "$s" >"$LAB/primary"
	[ "$(role_of "$p")" = secondary ] || fail "$p is $(role_of "$p") after the move, not secondary"
	[ "$(state_of "$p")" = diskless ] || fail "$p is $(state_of "$p"), not diskless"
	serving "$p" && fail "$p still serves"
	cmd_check "$s"
	cmd_put "$s" disk2 4 || fail "client write on $s after the move"
	log "rebuilding $p: new disk, tandem create, full resync"
	cmd_crash "$p"
	t=$(now)
	cmd_boot "$p" new-disk
	wait_for 120 "$p in sync on its new disk" sh -c "[ \"\$($SELF role-of $p)\" = secondary ] && [ \"\$($SELF state-of $p)\" = complete ]" ||
		fail "$p did not resync onto its new disk"
	timing disk_rebuild_boot_to_in_sync_s "$(elapsed "$t")"
	st=$(tandem_in "$p" status --json r0)
	log "$p resynced $(json_num "$st" bytes_resynced) of $(json_num "$st" data_size) bytes onto its new disk"
	serving "$s" || fail "$s stopped serving while $p was rebuilt"
	v=$(tandem_in "$s" verify r0 --json) || fail "tandem verify failed: $v"
	grep -q '"differing":\[\]' <<<"$v" || fail "verify found differences after the rebuild: $v"
	cmd_check "$s"
}

cmd_run() {
	rm -f "$LAB/timings"
	local t
	t=$(now)
	cmd_up
	scenario_cold
	scenario_partition 1
	scenario_crash
	scenario_return
	scenario_partition 2
	scenario_switchover
	scenario_disk_failure
	timing total_s "$(elapsed "$t")"
	if [ -n "${TOCF_RESULTS:-}" ]; then
		cp "$LAB/timings" "$TOCF_RESULTS"
	fi
	log "all scenarios passed"
	cat "$LAB/timings"
}

main() {
	local cmd=${1:-help}
	shift || true
	case $cmd in
	up) cmd_up ;;
	down) cmd_down ;;
	run)
		trap 'cmd_down' EXIT
		cmd_run
		;;
	in) in_node "$@" ;;
	boot) cmd_boot "$@" ;;
	crash) cmd_crash "$@" ;;
	partition) cmd_partition ;;
	heal) cmd_heal ;;
	state) cmd_state ;;
	put) cmd_put "$@" ;;
	check) cmd_check "$@" ;;
	attach) cmd_attach ;;
	detach) cmd_detach ;;
	role-of) role_of "$1" ;;
	state-of) state_of "$1" ;;
	promoted-by) promoted_by_crm "$1" ;;
	serving) serving "$1" ;;
	scenario-*) "${cmd//-/_}" ;;
	help | -h | --help) sed -n '2,20p' "$0" ;;
	*) fail "unknown command $cmd (try help)" ;;
	esac
}

main "$@"
