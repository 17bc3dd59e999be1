# Networking test: an address from DHCP (or ringzero.ip=), pings to the gateway, and, with
# ringzero.peer=IP[,IP...], pings to other guests on the same network. DHCP hands addresses out
# in boot order, which two guests booted together do not fix, so both can be given the same
# list (ringzero.peer=10.0.2.15,10.0.2.16): each skips its own address. For each peer it waits
# (up to ringzero.wait=30 s) until the peer answers and pings it; then it stays up until the
# others have finished their own pings: until count echo requests per peer have come in and
# none for 5 s (at most ringzero.linger=120 s). ringzero.count=5 pings per peer;
# ringzero.start=S waits S seconds after getting the address.
# Prints: net-test: mac M / address A / gateway G dns D / gateway ping sent=N received=M
#         (or "gateway ping skipped (no default route)", static addresses) /
#         per peer: "peer IP answers after S s" and "peer IP ping sent=N received=M", or
#         "peer IP unreachable" / finally "done"
. /scripts/net-common.sh
net_up || exit 1
# ringzero.start=S: wait S seconds before the pings (to ping while another guest does something).
[ -n "$(net_arg start)" ] && sleep "$(net_arg start)"
if [ -n "$(net_gateway)" ]; then
    net_ping gateway "$(net_gateway)" 5
else
    echo "net-test: gateway ping skipped (no default route)"
fi
peers=$(net_arg peer | tr ',' ' ')
others=0
for peer in $peers; do
    [ "$peer" = "$(net_address)" ] && continue
    others=$((others + 1))
    start=$(net_seconds)
    if net_wait_for "$peer" "$(net_arg wait 30)"; then
        echo "net-test: peer $peer answers after $(($(net_seconds) - start)) s"
        net_ping "peer $peer" "$peer" "$(net_arg count 5)"
    else
        echo "net-test: peer $peer unreachable"
    fi
done
[ "$others" -gt 0 ] && net_linger "$(net_arg linger 120)" $((others * $(net_arg count 5)))
echo "net-test: done"
