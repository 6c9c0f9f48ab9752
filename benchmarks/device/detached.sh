#!/usr/bin/env bash
# On a lent GPU machine: runs that outlast one device call (600 s). `start` runs the given shell command in a new
# process session (setsid: it survives the end of the call) with its log and results under /tmp/detached;
# `wait S` (the same or a later call on the warm machine: the next call must come within ~30 s) follows the
# log for up to S seconds, then copies what the run has written so far to $OUT. Results are written after every
# row by the benchmarks, so a run cut off keeps what it measured.
#   bash benchmarks/device/detached.sh start 'python3 -m benchmarks.step_cache --out $D/out'   ($D = /tmp/detached)
#   bash benchmarks/device/detached.sh wait 580
set -u
D=/tmp/detached
case "${1:?start or wait}" in
  start)
    mkdir -p "$D/out"; rm -f "$D/rc"
    export D
    setsid nohup bash -c "$2; echo \$? > $D/rc" > "$D/log" 2>&1 < /dev/null &
    echo "detached: started (pid $!)";;
  wait)
    end=$((SECONDS + ${2:?seconds})); seen=0
    while [ $SECONDS -lt $end ] && [ ! -f "$D/rc" ]; do
      n=$(wc -l < "$D/log"); [ "$n" -gt "$seen" ] && sed -n "$((seen + 1)),${n}p" "$D/log" | grep -v -i "warn" ; seen=$n
      sleep 5
    done
    n=$(wc -l < "$D/log"); [ "$n" -gt "$seen" ] && sed -n "$((seen + 1)),${n}p" "$D/log" | grep -v -i "warn"
    cp -r "$D/out/." "$OUT/" 2>/dev/null; cp "$D/log" "$OUT/detached.log"
    if [ -f "$D/rc" ]; then echo "detached: finished, rc $(cat "$D/rc")"; else echo "detached: still running"; fi;;
esac
