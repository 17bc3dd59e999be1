# Networking test: serves ringzero.size=4 MiB of deterministic data (the line
# "ringzero-net-serve" repeated, cut at the size) over TCP port ringzero.port=8080, for a host
# to fetch through a port forward and compare. ringzero.server=nc (the default) sends it raw to
# the first client that connects (busybox `nc -l`; the guest goes on when the client has read it
# all and closed); ringzero.server=httpd serves it as /blob (busybox httpd) to any number of
# clients. Either stops after ringzero.serve_for=60 s at the latest.
# Prints: net-test: mac M / address A / gateway G dns D / serving md5 X bytes N /
#         listening port P server S / served status=S (nc: 0 once a client got it all)
. /scripts/net-common.sh
net_up || exit 1
bytes=$(($(net_arg size 4) * 1048576))
port=$(net_arg port 8080)
server=$(net_arg server nc)
mkdir -p /srv
yes ringzero-net-serve | head -c "$bytes" >/srv/blob
echo "net-test: serving md5 $(md5sum </srv/blob | cut -d' ' -f1) bytes $(stat -c %s /srv/blob)"
echo "net-test: listening port $port server $server"
if [ "$server" = httpd ]; then
    timeout "$(net_arg serve_for 60)" httpd -f -p "$port" -h /srv
else
    timeout "$(net_arg serve_for 60)" nc -l -p "$port" </srv/blob >/dev/null
fi
echo "net-test: served status=$?"
