# Shared by the net-*.sh scripts, which source it (`. /scripts/net-common.sh`; run on its own it
# only defines functions). Every wait is bounded: no step can hang the guest.
#
#   net_arg NAME [DEFAULT]   the value of ringzero.NAME=VALUE on the kernel command line
#   net_up                   eth0 up with an address: DHCP (udhcpc), or ringzero.ip=A.B.C.D[/N]
#                            (static, /24 by default; ringzero.gateway=G adds a default route).
#                            Prints "net-test: mac M" and "net-test: address A.B.C.D" (or
#                            "net-test: no address" and fails), then
#                            "net-test: gateway G dns D..." (from the lease).
#   net_gateway              the default route's gateway (nothing without one)
#   net_ping WHAT IP COUNT   COUNT pings, one a second; a reply counts if it comes before
#                            2 x COUNT + 10 s have passed (a slow host stretches the run, and
#                            that is not loss); prints "net-test: WHAT ping sent=N received=M"
#   net_wait_for IP SECS     succeeds as soon as IP answers a ping, fails after SECS seconds
#   net_linger SECS N        returns once at least N echo requests have come in since boot and
#                            none for the last 5 s (peers that still ping this guest are
#                            answered to their last ping), or after SECS seconds
#   net_now_ns, net_seconds  the guest's clock in ns (/proc/timer_list) and whole seconds of uptime

net_arg() {
    local value
    value=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^ringzero\.$1=//p" | tail -n 1)
    echo "${value:-$2}"
}

net_now_ns() {
    sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list
}

net_seconds() {
    cut -d. -f1 /proc/uptime
}

net_address() {
    ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n 1
}

net_gateway() {
    ip route | sed -n 's/^default via \([0-9.]*\).*/\1/p' | head -n 1
}

net_up() {
    local static attempt address gateway
    static=$(net_arg ip)
    if ! ip link set eth0 up 2>/dev/null; then
        echo "net-test: no eth0 (interfaces: $(ls /sys/class/net | tr '\n' ' '))"
        return 1
    fi
    echo "net-test: mac $(cat /sys/class/net/eth0/address)"
    if [ -n "$static" ]; then
        case $static in */*) ;; *) static=$static/24 ;; esac
        ip addr add "$static" dev eth0
        [ -n "$(net_arg gateway)" ] && ip route add default via "$(net_arg gateway)" dev eth0
    else
        # udhcpc: up to 5 DISCOVERs 2 s apart, then give up (-n); three such attempts, each
        # also cut off by timeout.
        for attempt in 1 2 3; do
            timeout 30 udhcpc -i eth0 -f -q -n -t 5 -T 2 -s /usr/share/udhcpc/default.script \
                >/tmp/udhcpc.log 2>&1 && break
            echo "net-test: dhcp attempt $attempt failed: $(tail -n 1 /tmp/udhcpc.log)"
        done
    fi
    address=$(net_address)
    gateway=$(net_gateway)
    if [ -z "$address" ]; then
        echo "net-test: no address"
        return 1
    fi
    echo "net-test: address $address"
    echo "net-test: gateway ${gateway:-none} dns $(sed -n 's/^nameserver //p' /etc/resolv.conf 2>/dev/null | tr '\n' ' ' | sed 's/ $//')"
}

net_ping() {
    local summary sent received
    # timeout: busybox ping can hang despite -w (seen with replies from a broadcast address).
    summary=$(timeout $((2 * $3 + 20)) ping -c "$3" -w $((2 * $3 + 10)) "$2" 2>&1 | grep 'packets transmitted')
    sent=$(echo "$summary" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    received=$(echo "$summary" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    echo "net-test: $1 ping sent=${sent:-0} received=${received:-0}"
}

# Echo requests this guest has received so far (Icmp InEchos in /proc/net/snmp).
net_echo_requests() {
    awk '$1 == "Icmp:" { if (!column) { for (i = 2; i <= NF; i++) if ($i == "InEchos") column = i } else { print $column; exit } }' /proc/net/snmp
}

net_linger() {
    local deadline=$(($(net_seconds) + $1)) quiet=0 last now
    last=$(net_echo_requests)
    while { [ "$quiet" -lt 5 ] || [ "$last" -lt "$2" ]; } && [ "$(net_seconds)" -lt "$deadline" ]; do
        sleep 1
        now=$(net_echo_requests)
        if [ "$now" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0; last=$now; fi
    done
}

net_wait_for() {
    local deadline=$(($(net_seconds) + $2))
    while [ "$(net_seconds)" -lt "$deadline" ]; do
        ping -c 1 -W 1 "$1" >/dev/null 2>&1 && return 0
        usleep 200000
    done
    return 1
}
