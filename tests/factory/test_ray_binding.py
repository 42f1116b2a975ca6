"""The Ray executor's local instance listens on loopback only (issue 21).

A fresh Python process (so no Ray instance of the test process is reused) trains a tiny job through
``RayExecutor()`` with no address; when the first model arrives, while Ray is up, it lists every
socket of its own process tree (the driver, the GCS server, the raylet, the agents, the autoscaler
monitor, the workers) from ``/proc``: TCP sockets in LISTEN state and bound UDP sockets, each mapped
to its process through the inodes of ``/proc/<pid>/fd``. None may be bound to a non-loopback
address. Linux only (``/proc``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the optional ray extra"),
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets through Linux's /proc"),
]

SCRIPT = textwrap.dedent('''
    import json, os, socket, sys
    from pathlib import Path

    from mlaudit.data.registry import DatasetSpec, load_dataset
    from mlaudit.factory import FactoryJob, RayExecutor, TrialSpec
    from mlaudit.models.registry import ModelSpec
    from mlaudit.train import Recipe

    LISTEN, UDP_UNCONNECTED = "0A", "07"


    def tree(root):
        """root and its descendants, from the parent pid in /proc/<pid>/stat."""
        kids = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += kids.get(pid, [])
        return out


    def address(hexaddr):
        ip, port = hexaddr.split(":")
        raw = bytes.fromhex(ip)
        if len(raw) == 4:
            return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four little-endian 32-bit words
        return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)


    def bound_sockets():
        """{inode: (proto, ip, port)} of listening TCP and unconnected UDP sockets."""
        found = {}
        for proto in ("tcp", "tcp6", "udp", "udp6"):
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
            for line in lines:
                f = line.split()
                state, inode = f[3], f[9]
                if state == (LISTEN if proto.startswith("tcp") else UDP_UNCONNECTED):
                    found[inode] = (proto, *address(f[1]))
        return found


    def listing():
        socks, rows = bound_sockets(), []
        for pid in tree(os.getpid()):
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\\0", b" ").decode()[:120]
                if pid == os.getpid():  # named by pid: a long temporary path can cut the script's name off
                    name = "ray_binding_probe (driver)"
                fds = list(Path(f"/proc/{pid}/fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    hit = socks.get(link[8:-1])
                    if hit:
                        rows.append({"pid": pid, "process": name, "proto": hit[0], "ip": hit[1], "port": hit[2]})
        return rows


    spec = DatasetSpec(name="synthetic", options={"n_train": 64, "n_test": 16})
    recipe = Recipe(lr=0.05, epochs=1, batch_size=16, augment="none")
    job = FactoryJob(model=ModelSpec(name="mlp", width=8), recipe=recipe, data=load_dataset(spec),
                     trials=(TrialSpec("m0", seed=0), TrialSpec("m1", seed=1)), data_spec=spec, max_chunk=1,
                     evaluate=False)
    seen = []


    def on_result(m):
        if not seen:
            seen.extend(listing())


    RayExecutor(num_cpus=1).execute(job, on_result=on_result)
    Path(sys.argv[1]).write_text(json.dumps(seen))
''')

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def component(process: str) -> str:
    for key in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "monitor.py", "dashboard.py",
                "log_monitor"):
        if key in process:
            return key
    return "worker" if process.startswith("ray::") else "driver" if "ray_binding_probe" in process else process


def test_a_local_ray_run_listens_on_loopback_only(tmp_path: Path) -> None:
    script, out = tmp_path / "ray_binding_probe.py", tmp_path / "sockets.json"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {component(r["process"]) for r in rows}
    # the probe saw the core of Ray, so an empty or partial listing cannot pass
    assert {"gcs_server", "raylet", "worker", "driver"} <= seen, seen
    exposed = [f"{component(r['process'])} (pid {r['pid']}): {r['proto']} {r['ip']}:{r['port']}"
               for r in rows if r["ip"] not in LOOPBACK]
    assert not exposed, "Ray processes bound to non-loopback addresses:\n" + "\n".join(exposed)
