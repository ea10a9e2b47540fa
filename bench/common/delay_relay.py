#!/usr/bin/env python3
"""A user-space delay line (there is no netem here): every IP packet the kernel routes
into the TUN device is written back into it DELAY_MS later, in order. The router
namespace sends everything arriving from either side into the device, so each direction
is delayed once: RTT = 2 x DELAY_MS. Usage: delay_relay.py TUN_NAME DELAY_MS"""

import collections
import fcntl
import os
import struct
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

name, delay = sys.argv[1], float(sys.argv[2]) / 1000.0
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
queue = collections.deque()
ready = threading.Condition()


def reader():
    while True:
        pkt = os.read(fd, 65535)
        with ready:
            queue.append((time.monotonic() + delay, pkt))
            ready.notify()


threading.Thread(target=reader, daemon=True).start()
print(f"delay relay on {name}: {delay * 1000:.1f} ms each way", flush=True)
while True:
    with ready:
        while not queue:
            ready.wait()
        due, pkt = queue[0]
    wait = due - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    with ready:
        queue.popleft()
    try:
        os.write(fd, pkt)
    except OSError:
        pass
