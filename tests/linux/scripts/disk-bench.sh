# Disk throughput (scripts/bench.sh --disk): 64 MiB written to, then read from, the start of
# /dev/vda with direct I/O (no page cache), 1 MiB per request, timed with the guest's clock
# ("now at N nsecs" of /proc/timer_list; under ringzero its clocksource counts host time).
echo "disk-bench: vda sectors=$(cat /sys/block/vda/size)"
for direction in write read; do
    start=$(sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list)
    if [ "$direction" = write ]; then
        dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct 2>/tmp/dd.log
    else
        dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/tmp/dd.log
    fi
    status=$?
    end=$(sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list)
    echo "disk-bench: $direction status=$status $(awk -v s="$start" -v e="$end" 'BEGIN { t = (e - s) / 1e9; if (t <= 0) t = 1e-9; printf "seconds=%.3f MiB/s=%.1f", t, 64 / t }')"
done
