# Virtual-disk test, second run (a new QEMU process on the same disk file): reads the first
# 1 MiB of /dev/vda back and compares it with the pattern the first run wrote.
name=$(cat /sys/class/dmi/id/product_serial)
echo "disk-test: vm=$name vda sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)"
yes "ringzero-pattern-$name" | head -c 1048576 >/tmp/pattern
head -c 1048576 /dev/vda >/tmp/read
if cmp -s /tmp/pattern /tmp/read; then
    echo "disk-test: pattern intact $(md5sum </tmp/read | cut -d' ' -f1)"
else
    echo "disk-test: pattern differs $(md5sum </tmp/read | cut -d' ' -f1)"
fi
