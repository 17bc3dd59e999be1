# Read-only image disk test: /dev/vda is an image packed into the boot bundle with
# writable = false. Prints its checksum (the test compares it with the image file's), then
# tries to write, which must fail.
echo "disk-test: vda sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)"
echo "disk-test: image md5 $(md5sum </dev/vda | cut -d' ' -f1)"
dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/tmp/dd.log
status=$?
echo "disk-test: write status $status ($(head -n 1 /tmp/dd.log))"
echo "disk-test: image md5 after $(md5sum </dev/vda | cut -d' ' -f1)"
