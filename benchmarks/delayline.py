"""A link with bandwidth **and latency** between two network namespaces: TUN devices and a userspace delay line.

This kernel has no ``netem`` (``CONFIG_NET_SCH_NETEM`` is not set), so a qdisc cannot add latency.
:class:`DelayLink` (root only) builds the link out of two namespaces, one ``tun`` device in each with a
point-to-point address (``10.78.0.1 peer 10.78.0.2`` and back), and one forwarder *process* (this module
run as ``python delayline.py --forward ...``) that holds both devices' file descriptors and moves every
packet from one device to the other after a serialisation time and a fixed one-way delay:

* each direction is a FIFO; a packet of ``len`` bytes read at ``now`` departs at
  ``depart = max(now, previous departure) + len * 8 / rate`` (a serial link of that rate: the time its
  last bit leaves) and is written to the other device at ``depart + delay``;
* the loop is ``select`` on both devices with a timeout to the next due packet;
* nothing is dropped unless a direction's queue would exceed ``queue_bytes`` (default 8 MB, far above
  the bandwidth-delay product); drops are counted and reported.

The forwarder enters each namespace (``setns`` through ``ctypes``: Python 3.11 has no ``os.setns``)
before it attaches to that namespace's device (``open("/dev/net/tun")`` + ``ioctl(TUNSETIFF,
IFF_TUN | IFF_NO_PI)``); the descriptors stay bound to their devices after it leaves.

A :class:`DelayLink` can be used wherever a :class:`slowlink.SlowLink` is (``namespaces``, ``devices``,
``addrs``, ``rate_bytes_per_s``, ``commands()``, ``up()``/``down()``, a context manager that turns
SIGTERM/SIGHUP into ``SystemExit``), e.g. ``slowlink.run_two_nodes(argv, DelayLink(), logs, timeout)``:
``GLOO_SOCKET_IFNAME`` is then the tun device. :meth:`DelayLink.down` stops the forwarder (which reports
its packet counts, drops and CPU time, :attr:`DelayLink.stats`), deletes the devices and the
namespaces; it also runs on errors, Ctrl-C and SIGTERM/SIGHUP. Should the driver die without running it
(SIGKILL), the forwarder notices (``PR_SET_PDEATHSIG``) and deletes the namespaces itself.

    python benchmarks/delayline.py                 # build the default link (100 Mbit/s, 25 ms one way), measure it
    python benchmarks/delayline.py --mbit 100 --delay-ms 25 --mtu 9000 --mb 20 --pings 20
    python benchmarks/delayline.py --gloo          # and a gloo all_reduce of 4.2 and 12.6 MB over it
    python benchmarks/delayline.py --smoke         # a short check: 5 pings, 2 MiB

The measurement: ``ping -c N`` between the namespaces (a UDP echo in Python when ``ping`` is missing),
a TCP bulk transfer one way and then both ways at once (Python senders and receivers, one per
namespace; the rate from the receiver's first to last byte), optionally ``dist.all_reduce`` between one
process per namespace (gloo over the tun devices, via ``slowlink.run_two_nodes``), and the forwarder's
CPU time (user + system) against the wall time. Results: docs/slow-link.md, section 4.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from netns import parse_rate  # noqa: F401  (part of this module's interface)
from netns import NamespaceLink
from netns import sh as _sh

sys.path.insert(0, str(Path(__file__).resolve().parent))

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1
READY = "delayline-ready"

_instances = 0


def can_make_delay_link() -> tuple[bool, str]:
    """Whether this process can build a :class:`DelayLink`, and if not, why."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "not root"
    if shutil.which("ip") is None:
        return False, "`ip` not found"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun missing"
    return True, ""


class DelayLink(NamespaceLink):
    """Two namespaces joined by two tun devices and a delay-line forwarder; use as a context manager.

    ``rate``: a ``tc``-style rate string (``"100mbit"``); ``delay_ms``: the one-way delay;
    ``mtu``: of both devices (large keeps the packet rate, and so the forwarder's CPU, low);
    ``queue_bytes``: per-direction bound above which packets are dropped (and counted);
    ``sysctls``: set in both namespaces after they are made (e.g. ``{"net.ipv4.tcp_slow_start_after_idle": "0"}``);
    ``nice``: the forwarder's nice increment.
    """

    def __init__(self, rate: str = "100mbit", delay_ms: float = 25.0,
                 addrs: tuple[str, str] = ("10.78.0.1", "10.78.0.2"), mtu: int = 9000,
                 queue_bytes: int = 8 << 20, nice: int = 0, sysctls: Optional[dict[str, str]] = None) -> None:
        global _instances
        _instances += 1
        super().__init__(rate, addrs, "dldl", "dlt", f"{os.getpid() % 100000}{'' if _instances == 1 else _instances}")
        self.delay_ms, self.mtu, self.queue_bytes, self.nice = delay_ms, mtu, queue_bytes, nice
        self.sysctls = dict(sysctls or {})
        self.stats: Optional[dict] = None
        self.forwarder_returncode: Optional[int] = None
        self.forwarder_stderr = ""
        self._proc: Optional[subprocess.Popen] = None
        self._stats_path: Optional[str] = None

    def commands(self) -> list[str]:
        """The shell commands :meth:`up` runs (the forwarder is started after the ``tuntap add`` lines)."""
        (na, nb), (da, db), (aa, ab) = self.namespaces, self.devices, self.addrs
        cmds = [f"ip netns add {na}", f"ip netns add {nb}"]
        for ns, dev, mine, peer in ((na, da, aa, ab), (nb, db, ab, aa)):
            cmds += [f"ip -n {ns} tuntap add dev {dev} mode tun",
                     f"ip -n {ns} link set {dev} mtu {self.mtu}",
                     f"ip -n {ns} addr add {mine} peer {peer} dev {dev}",
                     f"ip -n {ns} link set lo up",
                     f"ip -n {ns} link set {dev} up"]
            cmds += [f"ip netns exec {ns} sysctl -w {k}={v}" for k, v in self.sysctls.items()]
        return cmds

    def forwarder_command(self) -> list[str]:
        (na, nb), (da, db) = self.namespaces, self.devices
        return [sys.executable, os.path.abspath(__file__), "--forward", na, da, nb, db,
                "--rate-bps", repr(self.rate_bytes_per_s * 8), "--delay-ms", repr(self.delay_ms),
                "--queue-bytes", str(self.queue_bytes), "--mtu", str(self.mtu), "--nice", str(self.nice),
                "--stats", self._stats_path or "", "--parent", str(os.getpid())]

    def up(self) -> "DelayLink":
        ok, why = can_make_delay_link()
        if not ok:
            raise RuntimeError(f"cannot build the delay link: {why}")
        try:
            self._run_commands()
            self._stats_path = f"/tmp/{self.namespaces[0]}-stats.json"
            if os.path.exists(self._stats_path):
                os.unlink(self._stats_path)
            self._proc = subprocess.Popen(self.forwarder_command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True)
            line = _read_line(self._proc, timeout=30.0)
            if line.strip() != READY:
                err = self._proc.stderr.read() if self._proc.poll() is not None else ""
                raise RuntimeError(f"the delay-line forwarder did not start: {line!r} {err[-2000:]}")
        except subprocess.CalledProcessError as err:
            self.down()
            raise RuntimeError(f"{' '.join(err.cmd)} failed: {err.stderr.strip()}") from err
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop the forwarder (its report lands in :attr:`stats`), delete devices and namespaces. Idempotent."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.forwarder_returncode = proc.returncode
            self.forwarder_stderr = proc.stderr.read() if proc.stderr is not None else ""
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
            if self._stats_path and os.path.exists(self._stats_path):
                try:
                    self.stats = json.loads(Path(self._stats_path).read_text())
                except ValueError:
                    pass
                os.unlink(self._stats_path)
        for ns in reversed(self._created):
            dev = self.devices[self.namespaces.index(ns)]
            _sh("ip", "-n", ns, "link", "del", dev, check=False)
            _sh("ip", "netns", "del", ns, check=False)
        self._created = []

    def forwarder_pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if r else ""


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- the forwarder
def _setns(libc: ctypes.CDLL, path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _attach_tun(dev: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def forward(ns_a: str, dev_a: str, ns_b: str, dev_b: str, rate_bps: float, delay_s: float, queue_bytes: int,
            mtu: int, stats_path: str, parent: int, nice: int = 0) -> None:
    """The forwarder's main loop (see the module docstring); returns on SIGTERM after writing its stats."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops us in order
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGHUP, lambda *a: stop.append(1))
    if nice:
        os.nice(nice)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = []
    for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
        _setns(libc, f"/var/run/netns/{ns}")
        fds.append(_attach_tun(dev))
    if libc.setns(own, CLONE_NEWNET) != 0:  # back to where we started
        raise OSError(ctypes.get_errno(), "setns back")
    os.close(own)
    print(READY, flush=True)

    queues = [collections.deque(), collections.deque()]  # direction d: read from fds[d], write to fds[1 - d]
    queued = [0, 0]
    last_depart = [0.0, 0.0]
    st = {"packets": [0, 0], "bytes": [0, 0], "dropped": [0, 0], "write_errors": [0, 0], "max_queue_bytes": [0, 0],
          "max_late_ms": [0.0, 0.0]}
    bufsize = max(mtu, 1500) + 64
    start_wall, start_cpu = time.monotonic(), os.times()
    while not stop:
        now = time.monotonic()
        heads = [q[0][0] for q in queues if q]
        timeout = max(0.0, min(heads) - now) if heads else 0.2
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for d, fd in enumerate(fds):
            if fd not in readable:
                continue
            for _ in range(256):  # bounded, so that the other direction's due packets are not held up
                try:
                    pkt = os.read(fd, bufsize)
                except BlockingIOError:
                    break
                n = len(pkt)
                if queued[d] + n > queue_bytes:
                    st["dropped"][d] += 1
                    continue
                depart = max(now, last_depart[d]) + n * 8 / rate_bps
                last_depart[d] = depart
                queues[d].append((depart + delay_s, pkt))
                queued[d] += n
                st["max_queue_bytes"][d] = max(st["max_queue_bytes"][d], queued[d])
        now = time.monotonic()
        for d, q in enumerate(queues):
            while q and q[0][0] <= now:
                due, pkt = q.popleft()
                queued[d] -= len(pkt)
                st["max_late_ms"][d] = max(st["max_late_ms"][d], 1e3 * (now - due))
                try:
                    os.write(fds[1 - d], pkt)
                    st["packets"][d] += 1
                    st["bytes"][d] += len(pkt)
                except OSError:
                    st["write_errors"][d] += 1
        if os.getppid() != parent:
            break
    end_cpu = os.times()
    st["wall_s"] = time.monotonic() - start_wall
    st["cpu_s"] = (end_cpu.user - start_cpu.user) + (end_cpu.system - start_cpu.system)
    st["queued_at_exit"] = [len(q) for q in queues]
    if stats_path and os.getppid() == parent:  # nobody left to read it otherwise
        tmp = stats_path + ".tmp"
        Path(tmp).write_text(json.dumps(st))
        os.replace(tmp, stats_path)
    for fd in fds:
        os.close(fd)
    if os.getppid() != parent:  # the driver died without tearing the link down: do it for it
        for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
            _sh("ip", "-n", ns, "link", "del", dev, check=False)
            _sh("ip", "netns", "del", ns, check=False)


# ------------------------------------------------------------------------------------------- measuring it
_RECV = r"""
import socket, sys, time, json
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0; first = last = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    t = time.monotonic(); first = first or t; last = t; n += len(b)
print(json.dumps({"bytes": n, "seconds": last - first}), flush=True)
"""
_SEND = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); buf = b"x" * (1 << 20)
for _ in range(int(sys.argv[3])): c.sendall(buf)
c.close()
"""
_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    b, a = s.recvfrom(2048)
    if b == b"stop": break
    s.sendto(b, a)
"""
_UDP_PING = r"""
import socket, sys, time, json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2.0); rtts = []
for i in range(int(sys.argv[3])):
    t = time.monotonic(); s.sendto(b"%d" % i, (sys.argv[1], int(sys.argv[2])))
    try: s.recvfrom(2048); rtts.append(1e3 * (time.monotonic() - t))
    except socket.timeout: pass
    time.sleep(0.2)
s.sendto(b"stop", (sys.argv[1], int(sys.argv[2]))); print(json.dumps(rtts))
"""


def measure_rtt(link, count: int) -> dict:
    """RTT from the first namespace to the second: ``ping -c count`` (or a Python UDP echo)."""
    (na, nb), (_, ab) = link.namespaces, link.addrs
    if shutil.which("ping"):
        out = _sh("ip", "netns", "exec", na, "ping", "-c", str(count), "-i", "0.2", ab, check=False).stdout
        m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
        loss = re.search(r"(\d+)% packet loss", out)
        if m:
            return {"tool": f"ping -c {count} -i 0.2", "min_ms": float(m[1]), "avg_ms": float(m[2]),
                    "max_ms": float(m[3]), "mdev_ms": float(m[4]), "loss_pct": float(loss[1]) if loss else None}
        return {"tool": "ping", "error": out[-500:]}
    port = 45000 + os.getpid() % 1000
    echo = subprocess.Popen(["ip", "netns", "exec", nb, sys.executable, "-c", _UDP_ECHO, ab, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        echo.stdout.readline()
        out = _sh("ip", "netns", "exec", na, sys.executable, "-c", _UDP_PING, ab, str(port), str(count)).stdout
        rtts = json.loads(out)
    finally:
        echo.kill()
        echo.wait()
    return {"tool": f"UDP echo x {count}", "min_ms": min(rtts), "avg_ms": sum(rtts) / len(rtts), "max_ms": max(rtts),
            "mdev_ms": None, "loss_pct": 100.0 * (1 - len(rtts) / count)}


def measure_tcp(link, megabytes: int, both_ways: bool = False) -> dict:
    """A TCP bulk transfer of ``megabytes`` MiB from the first namespace to the second (``both_ways``: and
    one from the second to the first at the same time; the slower direction's rate is reported)."""
    pairs = [(0, 1), (1, 0)] if both_ways else [(0, 1)]
    recvs, sends, results = [], [], []
    try:
        for src, dst in pairs:
            port = 46000 + os.getpid() % 1000 + src
            recvs.append(subprocess.Popen(["ip", "netns", "exec", link.namespaces[dst], sys.executable, "-c", _RECV,
                                           link.addrs[dst], str(port)], stdout=subprocess.PIPE, text=True))
            assert recvs[-1].stdout.readline().strip() == "listening"
        t0 = time.monotonic()
        for src, dst in pairs:
            port = 46000 + os.getpid() % 1000 + src
            sends.append(subprocess.Popen(["ip", "netns", "exec", link.namespaces[src], sys.executable, "-c", _SEND,
                                           link.addrs[dst], str(port), str(megabytes)]))
        for p in sends:
            p.wait(timeout=300)
        results = [json.loads(r.stdout.readline()) for r in recvs]
        total = time.monotonic() - t0
    finally:
        for p in recvs + sends:
            if p.poll() is None:
                p.kill()
            p.wait()
    res = min(results, key=lambda r: r["bytes"] / r["seconds"])
    res["total_seconds"] = total
    res["rate_Bps"] = res["bytes"] / res["seconds"]
    res["rates_Bps"] = [r["bytes"] / r["seconds"] for r in results]
    return res


_GLOO = r"""
import os, sys, time, json, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=int(os.environ["NODE_RANK"]), world_size=2)
n, repeats, out = int(sys.argv[1]), int(sys.argv[2]), []
for i in range(repeats):
    buf = torch.ones(n // 4); dist.barrier(); t = time.perf_counter(); dist.all_reduce(buf)
    out.append(time.perf_counter() - t)
if dist.get_rank() == 0: print("GLOO " + json.dumps(out), flush=True)
dist.barrier(); dist.destroy_process_group()
"""


def measure_gloo(link, nbytes: int, repeats: int) -> dict:
    """``dist.all_reduce`` of ``nbytes`` (float32) between two processes, one per namespace, gloo over the
    tun devices, ``repeats`` times back to back (the first one is reported apart: connection warm-up)."""
    import tempfile

    from slowlink import run_two_nodes  # imports lightning: only here

    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"node{i}.log" for i in range(2)]
        codes = run_two_nodes([sys.executable, "-c", _GLOO, str(nbytes), str(repeats)], link, logs, timeout=300)
        text = logs[0].read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("GLOO ")), None)
    if codes != [0, 0] or line is None:
        raise RuntimeError(f"gloo all_reduce over the link failed ({codes}): {text[-2000:]}")
    secs = json.loads(line[5:])
    return {"bytes": nbytes, "seconds": secs, "first_s": secs[0], "median_s": sorted(secs[1:])[len(secs[1:]) // 2]}


def measure(link: DelayLink, pings: int, megabytes: int) -> dict:
    pid = link.forwarder_pid()
    cpu0, t0 = proc_cpu_s(pid), time.monotonic()
    rtt = measure_rtt(link, pings)
    cpu1, t1 = proc_cpu_s(pid), time.monotonic()
    tcp = measure_tcp(link, megabytes)
    cpu2, t2 = proc_cpu_s(pid), time.monotonic()
    tcp_both = measure_tcp(link, megabytes, both_ways=True)
    return {"rtt": rtt, "tcp": tcp, "tcp_both_ways": tcp_both,
            "cpu": {"ping_cpu_s": cpu1 - cpu0, "ping_wall_s": t1 - t0, "tcp_cpu_s": cpu2 - cpu1, "tcp_wall_s": t2 - t1}}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbit", type=float, default=100.0, help="bandwidth, Mbit/s, each direction")
    p.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay, ms")
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--queue-bytes", type=int, default=8 << 20)
    p.add_argument("--nice", type=int, default=0, help="the forwarder's nice increment (negative: more priority)")
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--mb", type=int, default=20, help="MiB for the TCP bulk transfer")
    p.add_argument("--gloo", type=float, nargs="*", default=None, metavar="MB",
                   help="also time a gloo all_reduce of these sizes (MB, default 4.2 12.6) over the link, 6 times each")
    p.add_argument("--smoke", action="store_true", help="5 pings, 2 MiB")
    p.add_argument("--json", default=None)
    # the forwarder process
    p.add_argument("--forward", nargs=4, metavar=("NS_A", "DEV_A", "NS_B", "DEV_B"), help=argparse.SUPPRESS)
    p.add_argument("--rate-bps", type=float, help=argparse.SUPPRESS)
    p.add_argument("--stats", default="", help=argparse.SUPPRESS)
    p.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.forward:
        na, da, nb, db = args.forward
        return forward(na, da, nb, db, args.rate_bps, args.delay_ms / 1e3, args.queue_bytes, args.mtu,
                       args.stats, args.parent, args.nice)
    if args.smoke:
        args.pings, args.mb = 5, 2
    ok, why = can_make_delay_link()
    if not ok:
        print(f"SKIP: cannot build the delay link ({why})")
        return
    link = DelayLink(rate=f"{args.mbit:g}mbit", delay_ms=args.delay_ms, mtu=args.mtu, queue_bytes=args.queue_bytes,
                     nice=args.nice)
    load_before = loadavg()
    with link:
        res = measure(link, args.pings, args.mb)
        if args.gloo is not None:
            sizes = args.gloo or [4.202496, 12.607488]  # benchmarks/overlap.py's model: params, params + 2 states
            res["gloo"] = [measure_gloo(link, int(mb * 1e6) // 4 * 4, 6) for mb in sizes]
    res["forwarder"] = link.stats
    res["loadavg_1min_before"] = load_before
    rate = link.rate_bytes_per_s
    r, t, b, c = res["rtt"], res["tcp"], res["tcp_both_ways"], res["cpu"]
    print(f"delay line {args.mbit:g} Mbit/s, {args.delay_ms:g} ms one way, MTU {args.mtu}; "
          f"load average before: {load_before} (2 cores, shared)")
    from common import markdown_table
    print(markdown_table(["measure", "configured", "measured", "measured / configured", "forwarder CPU"], [
        [f"RTT ({r['tool']}), avg [min / max]", f"{2 * args.delay_ms:.1f} ms",
         f"{r['avg_ms']:.1f} ms [{r['min_ms']:.1f} / {r['max_ms']:.1f}]",
         f"{r['avg_ms'] / (2 * args.delay_ms):.2f}x",
         f"{c['ping_cpu_s']:.2f} s in {c['ping_wall_s']:.1f} s ({100 * c['ping_cpu_s'] / c['ping_wall_s']:.1f} %)"],
        [f"TCP bulk, {t['bytes'] / 2**20:.0f} MiB", f"{rate * 8 / 1e6:.1f} Mbit/s",
         f"{t['rate_Bps'] * 8 / 1e6:.1f} Mbit/s "
         f"({t['seconds']:.2f} s)", f"{t['rate_Bps'] / rate:.2f}x",
         f"{c['tcp_cpu_s']:.2f} s in {c['tcp_wall_s']:.1f} s ({100 * c['tcp_cpu_s'] / c['tcp_wall_s']:.1f} %)"],
        [f"TCP bulk both ways at once, {b['bytes'] / 2**20:.0f} MiB each", f"{rate * 8 / 1e6:.1f} Mbit/s each",
         " / ".join(f"{x * 8 / 1e6:.1f}" for x in b["rates_Bps"]) + " Mbit/s",
         f"{b['rate_Bps'] / rate:.2f}x (slower)", "-"],
    ] + [[f"gloo all_reduce {g['bytes'] / 1e6:.1f} MB, median of 5 [first]",
           f"{1e3 * (g['bytes'] / rate + 2 * args.delay_ms / 1e3):.0f} ms (n / rate + 2 delays)",
           f"{1e3 * g['median_s']:.0f} ms [{1e3 * g['first_s']:.0f}]",
           f"{g['median_s'] / (g['bytes'] / rate + 2 * args.delay_ms / 1e3):.2f}x", "-"]
          for g in res.get("gloo", [])]))
    s = link.stats or {}
    if s:
        print(f"forwarder: packets a->b {s['packets'][0]}, b->a {s['packets'][1]}; dropped {s['dropped']}; "
              f"max queue {max(s['max_queue_bytes']) / 1e6:.2f} MB; latest delivery {max(s['max_late_ms']):.1f} ms "
              f"after due; CPU {s['cpu_s']:.2f} s over {s['wall_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
