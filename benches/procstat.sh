#!/usr/bin/env bash
# Where the servers' CPU goes during a load-generator run, read from /proc: run it beside
# `loadgen` (it stops when killed, or after --seconds) and it prints, every half second, for
# every switchboard and nats-server process: the time (Unix seconds), pid, name, user and
# system CPU in clock ticks (/proc/PID/stat fields 14 and 15, 100 per second), the write
# system calls so far (/proc/PID/io `syscw`: write and writev; socket receives are not
# counted there) and the voluntary and involuntary context switches of all its threads.
# Each `loadgen direct` run starts a server of its own, so the rows of one pid are one run:
# the differences between two of its rows, divided by the messages delivered in between
# (the run's msg/s times the seconds), give the per-message figures of docs/performance.md.
#   benches/procstat.sh > samples.txt & target/release/loadgen direct --peers nats; kill %1
set -euo pipefail

seconds=3600
while (($#)); do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds N]" >&2; exit 2 ;;
  esac
done

echo "# time pid name utime stime syscw voluntary_cs involuntary_cs"
end=$((SECONDS + seconds))
while ((SECONDS < end)); do
  now=$(date +%s.%N)
  for pid in $(pgrep -x switchboard) $(pgrep -x nats-server); do
    # A process may end between pgrep and the reads: skip it then.
    stat=$(awk '{ print $14, $15 }' "/proc/$pid/stat" 2>/dev/null) || continue
    writes=$(awk '/^syscw/ { print $2 }' "/proc/$pid/io" 2>/dev/null) || continue
    switches=$(cat /proc/"$pid"/task/*/status 2>/dev/null |
      awk '/^voluntary_ctxt/ { v += $2 } /^nonvoluntary_ctxt/ { n += $2 } END { print v + 0, n + 0 }') || continue
    name=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
    echo "$now $pid $name $stat ${writes:-0} $switches"
  done
  sleep 0.5
done
