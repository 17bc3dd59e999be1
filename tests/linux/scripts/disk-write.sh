# Virtual-disk test, first run (tests/tests/disks.rs): writes a 1 MiB pattern naming this VM to
# the start of /dev/vda, flushes it (dd conv=fsync, then sync) and prints its checksum. The VM's
# name is its SMBIOS serial number.
name=$(cat /sys/class/dmi/id/product_serial)
echo "disk-test: vm=$name vda sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)"
yes "ringzero-pattern-$name" | head -c 1048576 >/tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=65536 conv=fsync 2>/tmp/dd.log
echo "disk-test: dd status $? ($(tail -n 1 /tmp/dd.log))"
sync
echo "disk-test: wrote $(md5sum </tmp/pattern | cut -d' ' -f1)"
