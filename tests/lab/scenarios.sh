# The lab's scenarios, sourced by lab.sh: `lab.sh scenario NAME [BACKEND [MODE]]`.
# Each one builds a fresh lab, asserts what the client (or the machine) observes, and tears the
# lab down on exit unless LAB_KEEP is set. Each step is bounded in time.
#
#   cold       A becomes master, B secondary, initial sync done; client writes through the VIP
#   loss       A crashes (kill -9 of everything, fs dropped); B takes over; every file reads back
#   return     then A comes back as secondary, resyncs only what changed; planned switch back
#   flap       20 rapid stop/start cycles of A's ucarp while the client writes; never both
#              mounted, the end state matches CARP, no acknowledged write lost
#   partition  A leaves the network: both CARP masters; on heal the split-brain is reported and
#              neither side's data is overwritten; then the operator resolves it with
#              `tandem resolve --discard-local` on B (backend tandem only)
#   watch      cold + loss with `tandem watch` instead of the switch in the ucarp scripts
#   keepalived cold + loss with keepalived (VRRPv3, adverts every 200 ms) instead of ucarp,
#              its notify scripts calling `tandem switch`

# JSON field of `tandem status --json share` on host $1 (first occurrence; numbers or strings).
status_field() {
	tandem "$1" status --json share 2>/dev/null | tr -d '\n' |
		grep -o "\"$2\": *\(\"[^\"]*\"\|[0-9.e+-]*\)" | head -n1 | sed 's/^[^:]*: *//; s/"//g'
}

split_brain_reported() {
	[ "$(status_field A state)" = split-brain ] || [ "$(status_field B state)" = split-brain ]
}

not_mounted() { ! is_mounted "$1"; }

is_tandem() { [ "$(backend)" = tandem ]; }

expect_role() {
	is_tandem || return 0
	local got
	got=$(role_of "$1")
	[ "$got" = "$2" ] || fail "$1: role $got, expected $2"
}

put_files() {
	local prefix=$1 n=$2 i
	for ((i = 1; i <= n; i++)); do
		cmd_put "$prefix$i" $((RANDOM % 512 + 16)) || fail "client could not write $prefix$i through the VIP"
	done
}

sc_cold() {
	cmd_boot A preempt
	wait_serving A 40
	cmd_boot B
	# B's ucarp starts as backup and runs its down script: B stays secondary, A serves.
	sleep 4
	wait_serving A 20
	expect_role A primary
	expect_role B secondary
	if is_tandem; then
		tandem A wait-sync share --timeout 60s || fail "A: not in sync with B"
		local st
		st=$(status_field A state)
		[ "$st" = complete ] || fail "A: state $st after the initial sync, expected complete"
	fi
	put_files cold 5
	cmd_verify
}

sc_loss() {
	sc_cold
	cmd_crash A
	wait_serving B 60
	expect_role B primary
	cmd_verify
	put_files loss 3
	cmd_verify
}

sc_return() {
	sc_loss
	local dirty=0 size=$((DISK_MB * 1024 * 1024)) mark=0
	if is_tandem; then
		dirty=$(status_field B dirty_bytes)
		log "B: ${dirty:-?} dirty bytes to resync while A is away (device $size bytes)"
		mark=$(wc -l <"$LAB/B/log/daemon.log")
	fi
	# A boots without preempt: it comes back as secondary and B keeps serving.
	cmd_boot A
	sleep 4
	wait_serving B 20
	expect_role A secondary
	if is_tandem; then
		tandem B wait-sync share --timeout 60s || fail "B: resync to A did not complete"
		local resynced
		# What the status said was dirty before A came back; else the daemon's own account.
		resynced=$(status_field B resynced_bytes)
		case $resynced in '' | null) resynced=$dirty ;; esac
		case $resynced in '' | null | 0)
			resynced=$(tail -n +"$((mark + 1))" "$LAB/B/log/daemon.log" |
				sed -n 's/.*sync of \([0-9]*\) bytes.*/\1/p' | tail -n1)
			;;
		esac
		[ -n "$resynced" ] || fail "no account of the resync (status --json or daemon log)"
		log "resynced $resynced bytes of $size"
		[ "${resynced%.*}" -gt 0 ] || fail "nothing was resynced although B wrote while A was away"
		[ "${resynced%.*}" -lt $((size / 8)) ] ||
			fail "resynced $resynced bytes: not an incremental resync of a ${size}-byte device"
	else
		log "backend none: one shared disk, nothing to resync"
	fi
	# Planned switch back: A's ucarp restarts with preempt and takes the VIP back.
	cmd_carp_stop A
	cmd_carp_start A preempt
	wait_serving A 60
	expect_role A primary
	expect_role B secondary
	cmd_verify
}

sc_flap() {
	sc_cold
	cmd_sampler_start
	# The client keeps writing; only writes it saw acknowledged count.
	(
		local i
		for ((i = 1; i <= 400; i++)); do
			[ -e "$LAB/C/writer.stop" ] && break
			cmd_put "flap$i" 32 >/dev/null 2>&1 || sleep 0.2
		done
	) &
	local writer=$! i
	for ((i = 1; i <= 20; i++)); do
		cmd_carp_stop A
		sleep "0.$((RANDOM % 9 + 1))"
		[ $((i % 5)) = 0 ] && sleep 2.5 # now and then long enough for B to take over
		cmd_carp_start A preempt
		sleep "$((RANDOM % 2)).$((RANDOM % 9 + 1))"
	done
	touch "$LAB/C/writer.stop"
	wait_for 60 "client writer to stop" not_alive "$writer" || kill -KILL "$writer"
	# Let CARP settle: the end state must be whatever CARP decided.
	sleep 5
	local holder
	holder=$(vip_holder)
	[ "$holder" = A ] || [ "$holder" = B ] || fail "after flapping no single VIP holder: '$holder'"
	wait_serving "$holder" 60
	cmd_sampler_stop
	expect_role "$holder" primary
	expect_role "${PEER[$holder]}" secondary
	log "$(wc -l <"$LAB/C/acked") files acknowledged to the client; CARP master $holder serves"
	cmd_verify
}

sc_partition() {
	is_tandem || fail "partition: only with backend tandem (one shared disk has no safe partition)"
	sc_cold
	cmd_carp_stop B
	cmd_carp_start B # B must not preempt on heal.
	sleep 3
	wait_serving A 20
	log "partition: A leaves the network (its link stays up)"
	partition A
	# Both become CARP masters: A never hears B leave, B stops hearing A. B promotes without
	# its peer (tandem cannot tell a dead peer from an unreachable one: no quorum here).
	wait_for 30 "B promoted while cut off" is_mounted B ||
		fail "B did not take over during the partition: $(cmd_state)"
	wait_for 30 "client sees B" client_ls || fail "client cannot reach the share on B"
	is_mounted A || fail "A gave up although its link stayed up: $(cmd_state)"
	# The client (on B's side) writes; a local writer on A's side writes too.
	put_files partB 3
	head -c 300000 /dev/urandom >"$LAB/A/mnt/partA"
	sync -f "$LAB/A/mnt/partA"
	log "during the partition both serve: $(cmd_state) (A: $(status_field A state), B: $(status_field B state))"
	log "healing the network"
	heal A
	# CARP: A's better skew wins; B goes backup and demotes. The daemons must report the
	# split-brain and must not resync either way.
	wait_for 30 "B demoted" not_mounted B || fail "B still mounted after CARP made it backup"
	wait_for 60 "split-brain reported" split_brain_reported ||
		fail "no split-brain reported after the heal: A=$(status_field A state) B=$(status_field B state)"
	log "after the heal: $(cmd_state) (A: $(status_field A state), B: $(status_field B state))"
	sleep 5
	# B's disk (data from offset 0; tandem's metadata sits at the end) still holds what the
	# client wrote to B during the partition: the old primary did not overwrite it.
	local chk=$LAB/B/check
	mkdir -p "$chk"
	mount -o ro,noload,loop "$LAB/B/disk.img" "$chk" || fail "cannot inspect B's disk"
	local name sum got ok=1
	while read -r name sum; do
		case $name in partB*) ;; *) continue ;; esac
		got=$(sha256sum <"$chk/$name" 2>/dev/null | cut -d' ' -f1)
		[ "$got" = "$sum" ] || ok=0
	done <"$LAB/C/acked"
	umount "$chk"
	[ $ok = 1 ] || fail "B's partition-time writes were overwritten by the old primary"
	# Nor the other way: A still has what its side wrote.
	[ -s "$LAB/A/mnt/partA" ] || fail "A lost its partition-time write"
	# Nothing is resolved silently: still split-brain, never complete.
	split_brain_reported || fail "split-brain no longer reported: A=$(status_field A state) B=$(status_field B state)"
	log "split-brain reported on heal and left for the operator; both sides' writes intact"
	# The operator's way out: keep A's side (it serves), give up B's partition-time writes.
	tandem B resolve share --discard-local || fail "tandem resolve on B failed"
	tandem A wait-sync share --timeout 120s || fail "A: no resync to B after the resolve"
	[ "$(status_field A state)" = complete ] || fail "A: state $(status_field A state) after resolve"
	[ "$(status_field B state)" = complete ] || fail "B: state $(status_field B state) after resolve"
	# Every file the client wrote outside the partition still reads back through the VIP.
	grep -v '^partB' "$LAB/C/acked" >"$LAB/C/acked.kept"
	mv "$LAB/C/acked.kept" "$LAB/C/acked"
	cmd_verify
	log "resolved by discarding B's side: the pair is complete again"
}

sc_watch() {
	[ "$(mode)" = watch ] || fail "scenario watch needs MODE watch"
	sc_loss
}

sc_keepalived() {
	[ "$(mode)" = keepalived ] || fail "scenario keepalived needs MODE keepalived"
	sc_loss
	local crash carp
	crash=$(awk '/ crash$/ { t = $1 } END { print t }' "$LAB/A/log/switch.log")
	carp=$(awk -v t="$crash" '$1 >= t && / carp master/ { print $1; exit }' "$LAB/B/log/switch.log")
	log "keepalived: B became VRRP master $(awk -v a="$crash" -v b="$carp" 'BEGIN { printf "%d", (b - a) * 1000 }') ms after A crashed"
}

run_scenario() {
	local name=${1:?scenario name} be=${2:-${LAB_BACKEND:-none}} md=${3:-${LAB_MODE:-switch}}
	[ "$name" = watch ] && md=watch
	[ "$name" = keepalived ] && md=keepalived
	declare -F "sc_$name" >/dev/null ||
		fail "no scenario $name (cold loss return flap partition watch keepalived)"
	trap 'rc=$?; [ $rc != 0 ] && { log "state at failure: $(cmd_state)"; dump_logs; }; cmd_down; exit $rc' EXIT
	cmd_up "$be" "$md"
	local t0=$SECONDS
	"sc_$name"
	log "scenario $name passed in $((SECONDS - t0))s (backend=$be mode=$md)"
}

# On failure: the tail of every log, so CI output explains what happened.
dump_logs() {
	local f
	for f in "$LAB"/{A,B}/log/*.log "$LAB/C/client.log"; do
		[ -s "$f" ] || continue
		echo "---- $f (tail)" >&2
		tail -n 25 "$f" >&2
	done
}
