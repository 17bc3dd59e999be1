# Networking test: a guest that forges its source MAC address. After getting an address it
# pings the gateway with its own MAC, then changes eth0's MAC to ringzero.spoof=02:00:00:00:be:ef
# (virtio-net lets the guest do so: without VIRTIO_NET_F_CTRL_MAC_ADDR the device is not even
# told) and sends pings and ARP requests from it; then restores its MAC and pings again.
# Prints: net-test: mac M / address A / gateway G dns D / own ping sent=N received=M /
#         spoof mac OLD -> NEW (or "spoof mac change failed: ...") / spoofed ping sent=N received=M /
#         spoofed arping sent=N received=M / spoofed tx_packets=N (frames sent with the forged
#         MAC) / restored mac OLD / restored ping sent=N received=M
. /scripts/net-common.sh
net_up || exit 1
own=$(cat /sys/class/net/eth0/address)
spoof=$(net_arg spoof 02:00:00:00:be:ef)
gateway=$(net_gateway)
gateway=${gateway:-10.0.2.2}
net_ping own "$gateway" 3
if ip link set eth0 address "$spoof" 2>/tmp/spoof.err; then
    echo "net-test: spoof mac $own -> $(cat /sys/class/net/eth0/address)"
else
    echo "net-test: spoof mac change failed: $(cat /tmp/spoof.err)"
fi
tx=$(cat /sys/class/net/eth0/statistics/tx_packets)
net_ping spoofed "$gateway" 5
arping=$(timeout 10 arping -c 3 -w 5 -I eth0 "$gateway" 2>&1)
echo "net-test: spoofed arping sent=$(echo "$arping" | sed -n 's/^Sent \([0-9]*\) probe.*/\1/p') received=$(echo "$arping" | sed -n 's/^Received \([0-9]*\) response.*/\1/p')"
echo "net-test: spoofed tx_packets=$(($(cat /sys/class/net/eth0/statistics/tx_packets) - tx))"
ip link set eth0 address "$own"
ip neigh flush dev eth0
echo "net-test: restored mac $(cat /sys/class/net/eth0/address)"
net_ping restored "$gateway" 5
