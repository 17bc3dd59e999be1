# Networking stress: floods the network for ringzero.flood=20 seconds, as fast as busybox can:
# ringzero.flood_jobs=4 parallel `ping -i 0.001 -s 60000` to ringzero.flood_target (the gateway
# by default; the subnet's broadcast address reaches every guest). Each 60000-byte echo request
# leaves as 41 IP fragments, so a ping process, which the 1 ms timer limits to ~1000 requests/s,
# sends far more frames than `ping -A` or small pings do (busybox has no `ping -f`, `nc -u`
# or `ping -i 0`, which stops after one request). Then it checks the network still works.
# Prints: net-test: mac M / address A / gateway G dns D / flooding T for S s with J jobs /
#         flood frames=N bytes=B seconds=S frames/s=F MiB/s=R / after-flood ping sent=N received=M (to the gateway)
. /scripts/net-common.sh
net_up || exit 1
seconds=$(net_arg flood 20)
jobs=$(net_arg flood_jobs 4)
gateway=$(net_gateway)
target=$(net_arg flood_target "${gateway:-10.0.2.2}")
echo "net-test: flooding $target for $seconds s with $jobs jobs"
stats=/sys/class/net/eth0/statistics
frames=$(cat $stats/tx_packets)
bytes=$(cat $stats/tx_bytes)
start=$(net_now_ns)
job=0
while [ "$job" -lt "$jobs" ]; do
    # busybox ping can hang on replies from a broadcast address despite -w: timeout bounds it.
    timeout "$seconds" ping -q -i 0.001 -s 60000 -w "$seconds" "$target" >/dev/null 2>&1 &
    job=$((job + 1))
done
wait
end=$(net_now_ns)
frames=$(($(cat $stats/tx_packets) - frames))
bytes=$(($(cat $stats/tx_bytes) - bytes))
echo "net-test: flood frames=$frames bytes=$bytes $(awk -v f="$frames" -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { t = (e - s) / 1e9; if (t <= 0) t = 1e-9; printf "seconds=%.1f frames/s=%d MiB/s=%.1f", t, f / t, b / t / 1048576 }')"
net_ping after-flood "${gateway:-$target}" 3
