# Networking benchmark: one TCP stream of ringzero.mib=64 MiB (zeros, 64 KiB writes: `dd | nc`)
# on port ringzero.port=5001. ringzero.role=send (the default) sends it to ringzero.peer (the
# gateway by default, 10.0.2.2: under QEMU user networking that is the host's 127.0.0.1, where a
# listener must wait on the port) and times it with the guest's clock (/proc/timer_list) from
# the connection to the receiver closing it; it retries while the connection is refused (the
# receiver not listening yet). ringzero.role=recv listens (`nc -l`) and counts what arrives.
# Both give up after ringzero.wait=60 s. A receiver on the host must not shut its side of the
# connection down before the end: busybox nc stops sending when it sees the connection closed.
# Prints: net-test: mac M / address A / gateway G dns D / then
#   send: net-bench: send peer=IP port=P MiB=N attempts=K status=S seconds=T MiB/s=R
#         (status is nc's: 0 when the receiver took it all; "net-bench: send ... failed" otherwise)
#   recv: net-bench: recv port=P bytes=N
. /scripts/net-common.sh
net_up || exit 1
port=$(net_arg port 5001)
wait=$(net_arg wait 60)
if [ "$(net_arg role send)" = recv ]; then
    # nc's input must not end: busybox nc half-closes the connection at the end of its input,
    # and the sending nc exits when it sees that, dropping what it has not sent yet. A FIFO
    # opened read-write never ends.
    mkfifo /tmp/hold
    echo "net-bench: recv port=$port bytes=$(timeout "$wait" nc -l -p "$port" <>/tmp/hold | wc -c)"
    exit 0
fi
mib=$(net_arg mib 64)
gateway=$(net_gateway)
peer=$(net_arg peer "${gateway:-10.0.2.2}")
deadline=$(($(net_seconds) + wait))
[ "$peer" = "$gateway" ] || net_wait_for "$peer" "$wait" || echo "net-bench: peer $peer does not answer pings"
attempts=0
status=1
while [ "$(net_seconds)" -lt "$deadline" ]; do
    attempts=$((attempts + 1))
    start=$(net_now_ns)
    timeout $((deadline - $(net_seconds) + 1)) sh -c \
        "dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null | nc $peer $port >/dev/null 2>/tmp/nc.err"
    status=$?
    end=$(net_now_ns)
    # A refused connection fails at once: try again a little later.
    grep -q refused /tmp/nc.err || break
    sleep 1
done
result="send peer=$peer port=$port MiB=$mib attempts=$attempts status=$status"
if [ "$status" = 0 ]; then
    echo "net-bench: $result $(awk -v m="$mib" -v s="$start" -v e="$end" 'BEGIN { t = (e - s) / 1e9; if (t <= 0) t = 1e-9; printf "seconds=%.3f MiB/s=%.1f", t, m / t }')"
else
    echo "net-bench: $result failed: $(cat /tmp/nc.err)"
fi
