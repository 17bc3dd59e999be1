# Dead-disk test (tests/tests/disks.rs): the physical disk stops answering part way through the
# first read. Direct I/O, so each dd block is one request and no page cache hides the error.
echo "disk-test: vda sectors=$(cat /sys/block/vda/size)"
dd if=/dev/vda of=/dev/null bs=64k count=256 iflag=direct 2>/tmp/dd.log
echo "disk-test: first read status $?"
dd if=/dev/vda of=/dev/null bs=64k count=1 iflag=direct 2>/tmp/dd.log
echo "disk-test: second read status $?"
