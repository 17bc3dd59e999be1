# The stock Linux guest: Debian's cloud kernel and a busybox initramfs, built into target/linux/.
# Sourced, not run (though `bash scripts/lib/linux-guest.sh` also builds them, for a manual try).
#
#   rz_linux_guest            ensures target/linux/vmlinuz and target/linux/initramfs.cpio.gz
#                             (cached: nothing is fetched or rebuilt when both exist and were
#                             made from the current package versions and this init script)
#   rz_linux_kernel_package   prints the versioned package linux-image-cloud-amd64 depends on
#   rz_linux_fetch_kernel     apt-get download + dpkg-deb -x that package, copy boot/vmlinuz-*
#   rz_linux_build_initramfs  busybox-static's /bin/busybox + an /init + udhcpc's script, as a
#                             gzipped newc cpio
#
# On a fresh Debian machine it installs what is missing (cpio, gzip) and runs `apt-get update`
# at most once, saying what it does. Every message goes to stderr, prefixed with $RZ_PROG.
#
# The initramfs /init mounts proc, sys and dev (devtmpfs), prints "ringzero-linux: init
# started", loads the virtio modules it carries (RZ_LINUX_MODULES; "ringzero-linux: modules
# loaded: ..."), brings the loopback interface up, then runs `setsid cttyhack sh` (the console, ttyS0 with console=ttyS0, as the
# controlling terminal; a fixed prompt "~ # " that tests can wait for). When that shell exits,
# init powers the guest off (`poweroff -f`) instead of exiting, which would panic the kernel
# ("Attempted to kill init"). With `ringzero.run=NAME` on the kernel command line it runs
# /scripts/NAME.sh (tests/linux/scripts/NAME.sh) instead of the shell, then powers off.
# The NICs are left down; `udhcpc -i eth0` configures one from a DHCP lease through
# /usr/share/udhcpc/default.script (also at udhcpc's default path, /etc/udhcpc/default.script).

if ! declare -F rz_say >/dev/null 2>&1; then
    # shellcheck source=common.sh
    source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fi

RZ_LINUX_DIR=$RZ_ROOT/target/linux
RZ_LINUX_VMLINUZ=$RZ_LINUX_DIR/vmlinuz
RZ_LINUX_INITRAMFS=$RZ_LINUX_DIR/initramfs.cpio.gz
RZ_LINUX_STAMP=$RZ_LINUX_DIR/versions
# The metapackage that always depends on the current cloud kernel.
RZ_LINUX_META=linux-image-cloud-amd64
RZ_LINUX_APT_UPDATED=${RZ_LINUX_APT_UPDATED:-0}

rz_linux_sudo() {
    if [ "$(id -u)" -ne 0 ]; then sudo "$@"; else "$@"; fi
}

# apt-get update, at most once per shell.
rz_linux_apt_update_once() {
    [ "$RZ_LINUX_APT_UPDATED" = 1 ] && return 0
    rz_say "apt-get update (the package lists are needed to find the current cloud kernel)"
    rz_linux_sudo apt-get update -qq >&2 || rz_die "apt-get update failed"
    RZ_LINUX_APT_UPDATED=1
}

# Installs the Debian packages given that are missing, saying which (one apt-get update).
rz_linux_ensure_packages() {
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    rz_say "installing Debian packages: ${missing[*]}"
    rz_linux_apt_update_once
    mkdir -p "$RZ_LINUX_DIR"
    DEBIAN_FRONTEND=noninteractive rz_linux_sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >"$RZ_LINUX_DIR/apt-install.log" 2>&1 || {
        cat "$RZ_LINUX_DIR/apt-install.log" >&2
        rz_die "apt-get install ${missing[*]} failed"
    }
}

# The candidate version of a package, or nothing when apt does not know it.
rz_linux_package_version() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '^(none)$' | head -n 1
}

# Prints the versioned kernel package (e.g. linux-image-6.1.0-56-cloud-amd64), updating the
# package lists once if apt does not know the metapackage yet.
rz_linux_kernel_package() {
    local package
    package=$(apt-cache depends "$RZ_LINUX_META" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\(-unsigned\)\{0,1\}\)$/\1/p' | head -n 1)
    if [ -z "$package" ]; then
        rz_linux_apt_update_once
        package=$(apt-cache depends "$RZ_LINUX_META" 2>/dev/null \
            | sed -n 's/^ *|\{0,1\}Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\(-unsigned\)\{0,1\}\)$/\1/p' | head -n 1)
    fi
    [ -n "$package" ] || rz_die "cannot find the kernel package: \`apt-cache depends $RZ_LINUX_META\` names no linux-image-*-cloud-amd64"
    echo "$package"
}

# Downloads package $1 into $2 (a directory) and extracts it into $2/root; prints the .deb.
rz_linux_download_extract() {
    local package=$1 dir=$2 deb
    rm -rf "$dir" && mkdir -p "$dir/root" || rz_die "cannot create $dir"
    rz_say "downloading $package"
    # apt-get download writes into the current directory. As root it warns that the _apt user
    # cannot write there (the download is then not sandboxed): harmless, and silenced.
    if ! (cd "$dir" && apt-get download -q "$package" >/dev/null 2>"$dir/apt.log"); then
        # Stale package lists name a version the mirror no longer has: update once and retry.
        [ "$RZ_LINUX_APT_UPDATED" = 1 ] || {
            rz_linux_apt_update_once
            (cd "$dir" && apt-get download -q "$package" >/dev/null 2>"$dir/apt.log")
        } || {
            cat "$dir/apt.log" >&2
            rz_die "apt-get download $package failed"
        }
    fi
    deb=$(ls "$dir"/*.deb 2>/dev/null | head -n 1)
    [ -n "$deb" ] || rz_die "apt-get download $package produced no .deb in $dir"
    dpkg-deb -x "$deb" "$dir/root" || rz_die "dpkg-deb -x $deb failed"
    echo "$deb"
}

# Fetches kernel package $1 and copies its bzImage to target/linux/vmlinuz.
rz_linux_fetch_kernel() {
    local package=${1:-$(rz_linux_kernel_package)} dir=$RZ_LINUX_DIR/kernel-deb image
    rz_linux_download_extract "$package" "$dir" >/dev/null
    image=$(ls "$dir"/root/boot/vmlinuz-* 2>/dev/null | head -n 1)
    [ -n "$image" ] || rz_die "$package has no boot/vmlinuz-*"
    cp "$image" "$RZ_LINUX_VMLINUZ" || rz_die "cannot copy $image"
    # The kernel's config is kept beside it (useful to check what is built in); the modules
    # stay in kernel-deb/root/lib/modules, where the initramfs takes the ones it carries from.
    cp "$dir"/root/boot/config-* "$RZ_LINUX_DIR/config" 2>/dev/null || true
    rz_say "kernel: $RZ_LINUX_VMLINUZ (from $package, $(stat -c %s "$RZ_LINUX_VMLINUZ") bytes)"
}

# The initramfs's /init (its text is part of the cache key).
rz_linux_init_script() {
    cat <<'INIT'
#!/bin/busybox sh
# ringzero's Linux test guest: mount the pseudo file systems, then a shell on the console.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root TERM=vt100 PS1='~ # '
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "ringzero-linux: init started"
# The virtio drivers (modules in this kernel, in dependency order): disks and NICs on the PCI
# bus the hypervisor emulates. Each is loaded whether or not the VM has such a device.
loaded=""
for module in $(cat /lib/modules/order); do
    insmod "/lib/modules/$module.ko" && loaded="$loaded $module"
done
echo "ringzero-linux: modules loaded:$loaded"
ip link set lo up
cd /root
# With `ringzero.run=NAME` on the kernel command line, /scripts/NAME.sh (from tests/linux/scripts)
# runs instead of the interactive shell, and the guest powers off after it: sessions for
# emulators without console input (Bochs) and for tests that run several VMs at once.
run=$(sed -n 's/.*ringzero\.run=\([A-Za-z0-9_-]*\).*/\1/p' /proc/cmdline)
if [ -n "$run" ]; then
    if [ -f "/scripts/$run.sh" ]; then
        echo "ringzero-linux: running /scripts/$run.sh"
        sh "/scripts/$run.sh"
        echo "ringzero-linux: /scripts/$run.sh exited with status $?"
    else
        echo "ringzero-linux: no /scripts/$run.sh (ringzero.run=$run); the scripts are: $(ls /scripts)"
    fi
    poweroff -f
fi
# The shell gets the console (ttyS0 with console=ttyS0) as its controlling terminal. init must
# not exit (the kernel panics when PID 1 ends): when the shell ends, power off.
setsid cttyhack sh
echo "ringzero-linux: shell exited, powering off"
poweroff -f
INIT
}

# busybox udhcpc's event script (its text is part of the cache key): udhcpc only talks DHCP and
# leaves configuring the interface to this, called with $1 = deconfig, bound, renew, leasefail
# or nak and the lease in the environment ($interface, $ip, $mask as a prefix length, $router,
# $dns).
rz_linux_udhcpc_script() {
    cat <<'UDHCPC'
#!/bin/sh
# udhcpc's event script: apply the lease to $interface.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    for gateway in $router; do
        ip route add default via "$gateway" dev "$interface" && break
    done
    : >/etc/resolv.conf
    for server in $dns; do
        echo "nameserver $server" >>/etc/resolv.conf
    done
    ;;
esac
exit 0
UDHCPC
}

# The kernel modules the initramfs carries, in load order (each after what it depends on, as
# the modules' own `depends=` fields say): the virtio core and PCI transport, virtio-blk, and
# virtio-net with the failover modules it needs.
RZ_LINUX_MODULES="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk
net/core/failover drivers/net/net_failover drivers/net/virtio_net"

# Copies RZ_LINUX_MODULES from the extracted kernel package into $1, with an `order` file.
rz_linux_copy_modules() {
    local into=$1 base module
    base=$(ls -d "$RZ_LINUX_DIR"/kernel-deb/root/lib/modules/*/kernel 2>/dev/null | head -n 1)
    [ -n "$base" ] || rz_die "no kernel modules in $RZ_LINUX_DIR/kernel-deb (fetch the kernel package first)"
    mkdir -p "$into" || rz_die "cannot create $into"
    : >"$into/order"
    for module in $RZ_LINUX_MODULES; do
        [ -f "$base/$module.ko" ] || rz_die "the kernel package has no $module.ko"
        cp "$base/$module.ko" "$into/" || rz_die "cannot copy $module.ko"
        basename "$module" >>"$into/order"
    done
}

# Builds target/linux/initramfs.cpio.gz from busybox-static and the /init above.
rz_linux_build_initramfs() {
    local dir=$RZ_LINUX_DIR/busybox-deb tree=$RZ_LINUX_DIR/initramfs
    rz_linux_download_extract busybox-static "$dir" >/dev/null
    [ -x "$dir/root/bin/busybox" ] || rz_die "busybox-static has no /bin/busybox"
    rm -rf "$tree" && mkdir -p "$tree/bin" "$tree/dev" "$tree/proc" "$tree/sys" "$tree/tmp" "$tree/root" \
        "$tree/etc/udhcpc" "$tree/usr/share/udhcpc" || rz_die "cannot create $tree"
    cp "$dir/root/bin/busybox" "$tree/bin/busybox"
    ln -s busybox "$tree/bin/sh"
    rz_linux_init_script >"$tree/init"
    rz_linux_udhcpc_script >"$tree/usr/share/udhcpc/default.script"
    ln -s /usr/share/udhcpc/default.script "$tree/etc/udhcpc/default.script"
    rz_linux_copy_modules "$tree/lib/modules"
    mkdir -p "$tree/scripts" && cp "$RZ_ROOT"/tests/linux/scripts/*.sh "$tree/scripts/" \
        || rz_die "cannot copy tests/linux/scripts into the initramfs"
    chmod 755 "$tree/init" "$tree/bin/busybox" "$tree/usr/share/udhcpc/default.script"
    (cd "$tree" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --quiet | gzip -9 -n) >"$RZ_LINUX_INITRAMFS.tmp" \
        || rz_die "cannot build the initramfs"
    mv "$RZ_LINUX_INITRAMFS.tmp" "$RZ_LINUX_INITRAMFS"
    rz_say "initramfs: $RZ_LINUX_INITRAMFS ($(stat -c %s "$RZ_LINUX_INITRAMFS") bytes)"
}

# Ensures target/linux/vmlinuz and target/linux/initramfs.cpio.gz; cached by the versions of
# the kernel and busybox-static packages and the checksum of what goes into the initramfs (the
# init and udhcpc scripts, the module list, tests/linux/scripts/*.sh).
rz_linux_guest() {
    mkdir -p "$RZ_LINUX_DIR" || rz_die "cannot create $RZ_LINUX_DIR"
    local package kernel_version busybox_version init_sum stamp
    package=$(rz_linux_kernel_package) || exit
    kernel_version=$(rz_linux_package_version "$package")
    busybox_version=$(rz_linux_package_version busybox-static)
    [ -n "$busybox_version" ] || { rz_linux_apt_update_once; busybox_version=$(rz_linux_package_version busybox-static); }
    [ -n "$busybox_version" ] || rz_die "apt does not know busybox-static"
    init_sum=$( (rz_linux_init_script; rz_linux_udhcpc_script; echo "$RZ_LINUX_MODULES"; cat "$RZ_ROOT"/tests/linux/scripts/*.sh) \
        | cksum | cut -d' ' -f1)
    stamp="kernel=$package=$kernel_version busybox-static=$busybox_version init=$init_sum"
    if [ -s "$RZ_LINUX_VMLINUZ" ] && [ -s "$RZ_LINUX_INITRAMFS" ] && [ -f "$RZ_LINUX_STAMP" ] \
        && [ "$(cat "$RZ_LINUX_STAMP")" = "$stamp" ]; then
        rz_say "Linux guest up to date ($package $kernel_version, busybox-static $busybox_version)"
        return 0
    fi
    rz_linux_ensure_packages cpio gzip
    rm -f "$RZ_LINUX_STAMP"
    local old_kernel=""
    [ -f "$RZ_LINUX_STAMP.kernel" ] && old_kernel=$(cat "$RZ_LINUX_STAMP.kernel")
    if [ -s "$RZ_LINUX_VMLINUZ" ] && [ "$old_kernel" = "$package=$kernel_version" ] \
        && ls -d "$RZ_LINUX_DIR"/kernel-deb/root/lib/modules/*/kernel >/dev/null 2>&1; then
        rz_say "kernel up to date ($package $kernel_version)"
    else
        rz_linux_fetch_kernel "$package"
        echo "$package=$kernel_version" >"$RZ_LINUX_STAMP.kernel"
    fi
    rz_linux_build_initramfs
    echo "$stamp" >"$RZ_LINUX_STAMP"
}

# Run directly (not sourced): build the guest.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -uo pipefail
    RZ_PROG=linux-guest
    rz_linux_guest
fi
