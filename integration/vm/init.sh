#!/bin/sh
# /init of ferry's test guest: set the machine up, run /host/run.sh from the
# host's 9p share, report its exit code, and leave through qemu's
# isa-debug-exit port (0 -> qemu exits 1 = pass, 1 -> qemu exits 3 = fail).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/cryptsetup /run/lock/iscsi /var/lock /var/run /var/lib/iscsi /etc/iscsi/nodes
ln -sf /proc/self/fd /dev/fd

nonce=
for w in $(cat /proc/cmdline); do
	case "$w" in ferry.nonce=*) nonce="${w#ferry.nonce=}" ;; esac
done

leave() {
	echo "FERRY-VM-RESULT $nonce rc=$1"
	sync
	# The UART drains after echo returns; qemu exits on the port write, so
	# give the result line time to leave (it was seen cut short under load).
	sleep 0.5
	if [ "$1" = 0 ]; then v='\000'; else v='\001'; fi
	printf "$v" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
	poweroff -f
}

while read -r m; do
	insmod "$m" || echo "ferry-init: insmod $m failed"
done </etc/ferry-modules

# No udev here: libdevmapper creates /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

# slirp: the host is 10.0.2.2. No default route: the guest reaches the host
# and nothing beyond it.
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0

if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 host0 /host; then
	echo "ferry-init: cannot mount the host share"
	leave 98
fi

iscsid 2>/dev/null

read -r up _ </proc/uptime
echo "FERRY-VM-BOOTED $nonce uptime=$up"
if [ -x /host/run.sh ]; then
	/host/run.sh
	rc=$?
else
	echo "ferry-init: /host/run.sh missing"
	rc=99
fi
umount /host 2>/dev/null
leave $rc
