"""The one way a benchmark starts a service, and the one ``/proc`` sampler.

:class:`ServiceProcess` runs a service (``openrtc dispatcher``, a worker, a plain
livekit-agents worker) in a process group of its own, its output in a log file,
and stops it as ``kill`` would (SIGTERM, the service drains), then SIGKILLs what
is left of its group.

The sampler reads Linux ``/proc``: CPU seconds of a process (:func:`cpu_seconds`),
of each thread of a process tree by name (:func:`thread_cpu`), of the whole
machine (:func:`machine_cpu`), and RSS/PSS summed over a process tree
(:func:`sample_tree`, :func:`median_sample`). Elsewhere the CPU readers give 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, NamedTuple

import psutil

from _lib.stats import median

if TYPE_CHECKING:
    from _lib.tokens import Credentials

__all__ = [
    "REPO_ROOT",
    "MachineCpu",
    "Sample",
    "ServiceDied",
    "ServiceProcess",
    "children_of",
    "cpu_seconds",
    "machine_cpu",
    "median_sample",
    "sample_tree",
    "service_env",
    "stat_cpu_seconds",
    "stop_all",
    "thread_cpu",
    "tree",
]

#: Where services run from (``cwd``), unless told otherwise.
REPO_ROOT: Final = Path(__file__).resolve().parents[2]

# --- service processes ---------------------------------------------------------


class ServiceDied(RuntimeError):
    """A benchmarked process exited while the benchmark needed it."""


@dataclass(eq=False)
class ServiceProcess:
    """One service process, in a process group of its own (with any children it starts).

    Its output goes to ``log_path``. :meth:`check` raises :class:`ServiceDied`
    with the log's tail once it has exited; :meth:`stop` sends SIGTERM (a
    service drains, as on ``kill``), then SIGKILLs what is left of the group.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = REPO_ROOT
    proc: subprocess.Popen[bytes] | None = None
    #: The process id once started (kept after it stopped, for the report).
    pid: int = 0
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise :class:`ServiceDied` if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceDied(
                f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}"
            )

    def send_signal(self, sig: int) -> None:
        """``sig`` to the service's process alone (not its group)."""
        if self.proc is not None:
            self.proc.send_signal(sig)

    def log_text(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def tail(self, lines: int = 25) -> str:
        return "\n".join(f"  | {line}" for line in self.log_lines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        self.terminate()
        self.reap(grace)

    def terminate(self) -> None:
        """SIGTERM to the process group, if the process still runs."""
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                # start_new_session: the child leads its own group.
                os.killpg(self.proc.pid, signal.SIGTERM)

    def reap(self, grace: float = 10.0) -> None:
        """Wait up to ``grace`` seconds for the process, then SIGKILL what is left of its group."""
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within {grace:.0f}s: killed", file=sys.stderr)
            # Whatever is left of the group (job processes, a forkserver) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_all(services: Iterable[ServiceProcess], grace: float = 10.0) -> None:
    """SIGTERM every service at once, then wait for each (:meth:`ServiceProcess.reap`)."""
    services = list(services)
    for service in services:
        service.terminate()
    for service in services:
        service.reap(grace)


def service_env(
    livekit_url: str, creds: Credentials, redis_url: str, namespace: str, **extra: str
) -> dict[str, str]:
    """This environment without LiveKit/openrtc settings, plus the stack's and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LIVEKIT_", "OPENRTC_", "BENCH_", "REDIS_URL"))
    }
    env.update(
        LIVEKIT_URL=livekit_url,
        LIVEKIT_API_KEY=creds.api_key,
        LIVEKIT_API_SECRET=creds.api_secret,
        REDIS_URL=redis_url,
        OPENRTC_NAMESPACE=namespace,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# --- CPU -----------------------------------------------------------------------


def _stat_seconds(stat: str, ticks: int) -> float:
    """User + system CPU seconds from the text of a ``/proc/<pid>[/task/<tid>]/stat``."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat (utime, stime); fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / ticks


def stat_cpu_seconds(path: str) -> float:
    """User + system CPU seconds a ``/proc`` stat file says; raises ``OSError`` if it is gone."""
    with open(path) as f:
        return _stat_seconds(f.read(), os.sysconf("SC_CLK_TCK"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far, all threads (Linux ``/proc``; 0 elsewhere)."""
    try:
        return stat_cpu_seconds(f"/proc/{pid}/stat")
    except OSError:
        return 0.0


class MachineCpu(NamedTuple):
    """The machine's CPU time so far, in clock ticks: ``/proc/stat``'s ``cpu`` line.

    ``ticks`` is user, nice, system, idle, iowait, irq, softirq, steal, guest,
    guest_nice (as many as the kernel gives; none elsewhere than Linux).
    """

    ticks: tuple[int, ...]

    def busy_total(self) -> tuple[int, int]:
        """(busy, total) ticks: busy is all but idle and iowait; (0, 0) if unknown."""
        if not self.ticks:
            return 0, 0
        idle = self.ticks[3] + (self.ticks[4] if len(self.ticks) > 4 else 0)
        return sum(self.ticks) - idle, sum(self.ticks)

    def seconds(self) -> tuple[float, float, float]:
        """(busy in processes, in interrupt handlers, stolen) CPU seconds.

        Interrupt time (loopback networking's softirqs, mostly) is not charged
        to any process.
        """
        if not self.ticks:
            return 0.0, 0.0, 0.0
        values = list(self.ticks[:8]) + [0] * (8 - len(self.ticks[:8]))
        user, nice, system, _idle, _iowait, irq, softirq, steal = values
        tick = os.sysconf("SC_CLK_TCK")
        return (user + nice + system) / tick, (irq + softirq) / tick, steal / tick


def machine_cpu() -> MachineCpu:
    """The machine's CPU ticks so far (:class:`MachineCpu`; empty outside Linux)."""
    try:
        with open("/proc/stat") as f:
            return MachineCpu(tuple(int(x) for x in f.readline().split()[1:]))
    except (OSError, ValueError):
        return MachineCpu(())


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from ``/proc/<pid>/stat``; none outside Linux)."""
    found = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


# --- memory and CPU of a process tree ------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at a process tree. Sizes in bytes."""

    rss: int
    pss: int
    processes: int
    threads: int
    #: The worker process alone (not its children).
    main_rss: int
    main_anon: int
    main_file: int
    #: CPU seconds used so far by the processes seen (user + system).
    cpu_seconds: float = 0.0
    at: float = 0.0
    #: The machine's 1-minute load average.
    load: float = 0.0
    #: CPU use of the tree between the first and last sample, in % of one core.
    cpu_percent: float = 0.0


def _read_kb(path: str, names: Sequence[str]) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in names:
                values[key] = int(rest.split()[0])
    return values


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty once it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample_tree(pid: int) -> Sample:
    """RSS and PSS summed over ``pid`` and its descendants, from ``/proc``."""
    rss = pss = threads = processes = 0
    cpu = 0.0
    main = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for process in tree(pid):
        try:
            status = _read_kb(
                f"/proc/{process.pid}/status", ("VmRSS", "RssAnon", "RssFile", "Threads")
            )
            rollup = _read_kb(f"/proc/{process.pid}/smaps_rollup", ("Pss",))
            seconds = stat_cpu_seconds(f"/proc/{process.pid}/stat")
        except (psutil.Error, OSError, IndexError, ValueError):
            continue  # exited while we looked
        if "VmRSS" not in status:
            continue  # a zombie
        processes += 1
        rss += status["VmRSS"] * 1024
        pss += rollup.get("Pss", 0) * 1024
        threads += status.get("Threads", 0)  # a count, not kB
        cpu += seconds
        if process.pid == pid:
            main = status
    return Sample(
        rss=rss,
        pss=pss,
        processes=processes,
        threads=threads,
        main_rss=main.get("VmRSS", 0) * 1024,
        main_anon=main.get("RssAnon", 0) * 1024,
        main_file=main.get("RssFile", 0) * 1024,
        cpu_seconds=cpu,
        at=time.monotonic(),
        load=os.getloadavg()[0],
    )


def median_sample(samples: Sequence[Sample]) -> Sample:
    """Field by field medians; CPU use over the whole sampling window."""

    def med(get: Callable[[Sample], int]) -> int:
        return int(median(get(s) for s in samples))

    return Sample(
        rss=med(lambda s: s.rss),
        pss=med(lambda s: s.pss),
        processes=med(lambda s: s.processes),
        threads=med(lambda s: s.threads),
        main_rss=med(lambda s: s.main_rss),
        main_anon=med(lambda s: s.main_anon),
        main_file=med(lambda s: s.main_file),
        load=max(s.load for s in samples),
        cpu_percent=_cpu_percent(samples[0], samples[-1]),
    )


def _cpu_percent(first: Sample, last: Sample) -> float:
    elapsed = last.at - first.at
    if elapsed <= 0:
        return 0.0
    return max(0.0, 100 * (last.cpu_seconds - first.cpu_seconds) / elapsed)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by the threads of ``pid``'s tree, summed by thread name.

    Native threads (libwebrtc's, the livekit FFI's tokio runtime) are invisible
    to a Python profiler; their names say where that share of the time goes.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, float] = {}
    for process in tree(pid):
        try:
            tids = os.listdir(f"/proc/{process.pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{process.pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            seconds = _stat_seconds(stat, ticks)
            # Numbered pool threads ("tokio-runtime-w", "ThreadPoolExecutor-0_3") group.
            key = name.rstrip("0123456789_-") or name
            by_name[key] = by_name.get(key, 0.0) + seconds
    return by_name
