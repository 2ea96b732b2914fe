"""A real one-node Slurm cluster on loopback for the tests: munged, slurmctld and slurmd from the
system's packages (``scripts/install-test-deps.sh``), run as foreground children with their own
configuration, key, sockets, ports and state in one directory.

Clients reach it through ``SLURM_CONF`` (``Cluster.env``). The node declares more CPUs than the
machine has (``SlurmdParameters=config_overrides``) so that a few consumer ranks fit on two cores.
There is no accounting database: ``sacct`` does not work, finished jobs stay visible to ``squeue``
and ``scontrol`` for ``MinJobAge`` seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from waiting import eventually

from common.ports import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODE = "localhost"
PARTITION = "debug"
CPUS = 8


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "a test Slurm cluster runs its daemons as root; these tests need root"
    absent = [name for name in (*DAEMONS, *CLIENTS, "mungekey")
              if shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None]
    if not [*Path("/usr/lib").glob("libpmix.so"), *Path("/usr/lib").glob("*/libpmix.so")]:
        absent.append("libpmix.so, which Slurm's PMIx plugin loads")
    if absent:
        return (f"Slurm, munge or PMIx is not installed ({', '.join(absent)} missing); "
                "scripts/install-test-deps.sh installs them as root with apt-get")
    return None


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    assert found is not None, name
    return found


@dataclass(frozen=True)
class Cluster:
    root: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client (and the control plane that runs one) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=30, check=False, env={**os.environ, **self.env})

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(self.root.glob("*.log")))


def _slurm_conf(root: Path, munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=dsntest",
        f"SlurmctldHost={NODE}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        f"TmpFS={root / 'spool'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "ReturnToService=2",
        # Finished jobs stay listed by squeue and scontrol this long: without accounting, that is
        # where their outcome is read.
        "MinJobAge=300",
        "KillWait=10",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={CPUS} Feature=cpu State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=NO",
        "",
    ])


def _start(stack: ExitStack, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = stack.enter_context(log.open("ab"))
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    stack.callback(stop)
    return process


def _node_idle(cluster: Cluster, daemons: list[subprocess.Popen[bytes]]) -> bool:
    dead = [p.args for p in daemons if p.poll() is not None]
    if dead:
        raise RuntimeError(f"a Slurm daemon exited: {dead}\n{cluster.logs()}")
    state = cluster.client("sinfo", "-h", "-n", NODE, "-o", "%T").stdout.strip()
    return state == "idle"


@contextmanager
def running_cluster(root: Path) -> Iterator[Cluster]:
    """munged, slurmctld and slurmd in ``root``; yields once the node is idle, stops them all."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # the jobs' working directories live below; slurmd reads them as root
    for name in ("state", "spool", "munge"):
        (root / name).mkdir(mode=0o700, exist_ok=True)
    key, socket = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    subprocess.run([_tool("mungekey"), "--create", "--keyfile", str(key)], check=True,
                   capture_output=True, timeout=30)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, socket))
    # Beside slurm.conf: the PMIx plugin's per-step directories stay inside this cluster's root
    # (each new cluster numbers its jobs from 1 again).
    (root / "pmix").mkdir(mode=0o755, exist_ok=True)
    (root / "mpi.conf").write_text(f"PMIxCliTmpDirBase={root / 'pmix'}\n")
    cluster = Cluster(root, conf)
    with ExitStack() as stack:
        daemons = [
            _start(stack, [_tool("munged"), "--foreground", "--force", f"--key-file={key}",
                           f"--socket={socket}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                           f"--seed-file={root / 'munge' / 'munged.seed'}",
                           f"--log-file={root / 'munge' / 'munged.log'}"], root / "munged.log"),
        ]
        eventually(socket.exists, timeout_s=30, what="munged to open its socket")
        daemons.append(_start(stack, [_tool("slurmctld"), "-D", "-i", "-f", str(conf)],
                              root / "slurmctld.out.log"))
        daemons.append(_start(stack, [_tool("slurmd"), "-D", "-N", NODE, "-f", str(conf)],
                              root / "slurmd.out.log"))
        eventually(lambda: _node_idle(cluster, daemons), timeout_s=60,
                   what="the Slurm node to be idle")
        # Last out, before the daemons stop: job steps outlive slurmd, so no job may be left.
        stack.callback(_cancel_every_job, cluster)
        yield cluster


def _cancel_every_job(cluster: Cluster) -> None:
    cluster.client("scancel", f"--partition={PARTITION}")
    eventually(lambda: not cluster.client("squeue", "-h", "-t", "PD,R,CG,S").stdout.strip(),
               timeout_s=60, what="every job of the test cluster to end")
