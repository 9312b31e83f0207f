"""Memory density: one worker's resident memory at 1, 10 and 50 real concurrent sessions.

Run from the repository root::

    .venv/bin/python bench/density.py                  # 1, 10, 50 sessions; three workers
    .venv/bin/python bench/density.py --check          # exit 1 if the goal is missed
    .venv/bin/python bench/density.py --sessions 1,5 --systems coroutine,process

One run, on this machine, against a real ``livekit-server`` and a real
``redis-server`` (``openrtc.devtools.devstack``, free loopback ports). Three workers are
measured one after the other, each serving the offline dental agent
(``examples/offline_agents/dental.py``: a tone TTS greeting, no STT or LLM):

* **openrtc coroutine**: ``openrtc worker --agent dental --isolation coroutine
  --concurrency 50 --max-queue-age 300 --lease 30`` (a subprocess), fed by
  enqueuing jobs on its Redis stream directly (``StreamStore.enqueue``, the
  entries the dispatcher writes);
* **openrtc process**: the same with ``--isolation process``: one child process
  per session, plus one warm idle child;
* **plain livekit-agents**: ``_plain_density_worker.py start``, an
  ``AgentServer`` with an explicit agent name, dispatched with
  ``agent_dispatch.create_dispatch``; one job process per session (forked from
  livekit-agents' forkserver), plus one warm idle process.

For each session the bench creates a room, joins it as a caller and
dispatches the job. The caller subscribes to the agent and, with
``--caller-audio tone``, also publishes a quiet 400 Hz tone (8 kHz mono) that
the agent subscribes to. A session counts once the caller saw an agent
participant and its peer connection receives the agent's audio RTP packets
(and, with the tone, the agent subscribed to it and its packets go out);
greetings heard are counted too. After sampling, the server is asked as
well: every room holds exactly one agent participant (kind AGENT) publishing
audio, and no other room is in use. Sessions are added in batches
(``--batch``), each verified before the next; all stay up until the worker
is stopped. A call whose audio never flows (a WebRTC transport that never
carries media, now and then on a loaded machine) is hung up and replaced; the
report counts them.

Memory is resident set size (``VmRSS``) summed over the worker process and
every descendant (``psutil`` walks the tree; values from ``/proc``), sampled
``--samples`` times a second apart once the tree's process count has been
still for ``--settle`` seconds; the median is reported. Summed RSS counts a
page shared by several processes (shared libraries, copy-on-write pages after
a fork) once per process, so the proportional set size (``Pss``, shared pages
divided among their sharers) is reported beside it.

Three things keep a 2-core machine from measuring a collapse instead of
memory; none changes what a session holds in memory:

* callers only listen by default: with the tone, each session costs the worker
  about twice the CPU (decoding, resampling, gain control), and 50 of them
  with 50 callers need more than two cores;
* the script re-runs itself without CAP_SYS_NICE (``--allow-realtime`` keeps
  it), so libwebrtc's audio threads cannot take SCHED_FIFO and starve the
  event loops, Redis and livekit-server (:func:`_drop_realtime`);
* openrtc workers get ``--lease 30`` (``--lease``): with the default 5 s a
  stalled event loop lets the worker reclaim its own running calls (see
  bench/README.md).

Goal: 50 sessions in one coroutine-mode worker use at most a fifth of the
resident memory of 50 process-mode sessions (total RSS of the worker tree,
idle warm processes included).
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import anyio
import numpy as np
import psutil
from _lib.figures import record_figure
from _lib.procs import Sample, ServiceProcess, median_sample, sample_tree, thread_cpu, tree
from _lib.tokens import caller_token
from anyio.abc import TaskGroup, TaskStatus
from livekit import api, rtc
from livekit.protocol import agent as proto
from livekit.protocol import models

from openrtc.devtools.devstack import LIVEKIT_VERSION, LiveKitServer, RedisServer
from openrtc.settings import LiveKitSettings
from openrtc.store.streams import StreamStore, connect_redis
from openrtc.wire.keys import Keys
from openrtc.wire.messages import JobMessage, accept_arguments

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
OFFLINE_AGENTS: Final = REPO_ROOT / "examples" / "offline_agents"
PLAIN_WORKER: Final = BENCH_DIR / "_plain_density_worker.py"
AGENT: Final = "dental"
PLAIN_AGENT_NAME: Final = "dental-plain"
#: Coroutine mode at 50 sessions must use at most 1/GOAL of process mode's memory.
GOAL: Final = 5.0
#: openrtc's calls per core (its better mode) must be at least CPU_GOAL x plain's.
CPU_GOAL: Final = 1.5
MB: Final = 1024 * 1024

#: The caller's tone: low rate, quiet, 100 ms frames (40 whole cycles each).
TONE_RATE: Final = 8000
TONE_HZ: Final = 400
TONE_FRAME_MS: Final = 100
TONE_AMPLITUDE: Final = 2000
#: A frame of the agent's audio is loud when a sample exceeds this (ToneTTS peaks at 9000).
LOUD: Final = 1000
HEARD_FRAMES: Final = 10

WORKER_READY_TIMEOUT: Final = 120.0
CALLER_START_TIMEOUT: Final = 30.0
CALLER_ATTEMPTS: Final = 3
#: A call whose agent joined this long ago without audio flowing both ways is broken.
MEDIA_TIMEOUT: Final = 45.0
#: A call with no agent this long after its dispatch is dispatched again (plain only).
REDISPATCH_AFTER: Final = 20.0
MAX_REDISPATCHES: Final = 3
STOP_GRACE: Final = 30.0
SETTLE_LIMIT: Final = 120.0


class BenchError(RuntimeError):
    """The run could not measure what it claims to; the message says why."""


_E = TypeVar("_E", bound=BaseException)


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


# -- servers -----------------------------------------------------------------


class BenchLiveKitServer(LiveKitServer):
    """``openrtc.devtools.devstack.LiveKitServer`` that advertises a loopback STUN address.

    With no STUN server configured, livekit-server tells every client to use
    its public defaults (``stun.l.google.com``, ``global.stun.twilio.com``...),
    and libwebrtc resolves those names for each peer connection, one blocking
    ``AsyncResolver`` thread per name and address family. On a machine whose
    DNS does not answer (this benchmark's sandbox), each such thread waits 5 s
    or more, and connecting ten rooms at once leaves ~500 of them in the
    process, in the caller process and the worker alike: thread stacks in the
    sample and a CPU spike that delays the joins. ``127.0.0.1:9`` (discard)
    needs no DNS and fails at once; media uses the loopback host candidates,
    as before. Nothing else in the server configuration changes.
    """

    def config_yaml(self) -> str:
        anchor = "  enable_loopback_candidate: true\n"
        base = super().config_yaml()
        assert anchor in base, "openrtc.devtools.devstack changed its LiveKit configuration"
        return base.replace(anchor, anchor + "  stun_servers: ['127.0.0.1:9']\n")


# -- the worker under test ---------------------------------------------------


class Service(ServiceProcess):
    """A worker subprocess in a session of its own (Ctrl-C here does not reach it).

    Every process of its tree seen while it runs is remembered, so :meth:`kill`
    also ends children left behind by a parent that already exited. Processes
    are ended one by one through ``psutil``, which checks a pid still names the
    process it saw (no pid reuse accidents), never by process group or name.
    """

    def __init__(self, label: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(label, argv, env, log_path, REPO_ROOT)
        self._seen: dict[int, psutil.Process] = {}

    @property
    def label(self) -> str:
        return self.name

    def start(self) -> None:
        super().start()
        _SERVICES.append(self)

    def alive(self) -> bool:
        return self.running()

    def check_alive(self) -> None:
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            raise BenchError(f"{self.label}: the worker exited (code {code}); see {self.log_path}")

    def remember(self) -> list[psutil.Process]:
        processes = tree(self.pid) if self.alive() else []
        for p in processes:
            self._seen.setdefault(p.pid, p)
        return processes

    def sample(self) -> Sample:
        self.remember()
        return sample_tree(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_lines()[-lines:])

    async def stop(self) -> None:  # type: ignore[override]
        """SIGTERM (the worker drains), then SIGKILL whatever is left after the grace."""
        if self.alive():
            self.remember()
            self.send_signal(signal.SIGTERM)
            with anyio.move_on_after(STOP_GRACE):
                while self.alive():
                    self.remember()
                    await anyio.sleep(0.2)
            if self.alive():
                log(f"{self.label}: still running {STOP_GRACE:.0f}s after SIGTERM; killing it")
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and every process of its tree still running; reap the worker."""
        self.remember()
        for process in self._seen.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
            except psutil.Error:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log(f"{self.label}: pid {self.proc.pid} did not exit after SIGKILL")
        if self._log is not None:
            self._log.close()
            self._log = None


#: Every service started, for the last-resort kill when the event loop is gone.
_SERVICES: list[Service] = []


# -- callers -----------------------------------------------------------------


def _tone_frame() -> rtc.AudioFrame:
    samples = TONE_RATE * TONE_FRAME_MS // 1000
    t = np.arange(samples) / TONE_RATE
    pcm = (np.sin(2 * np.pi * TONE_HZ * t) * TONE_AMPLITUDE).astype(np.int16)
    return rtc.AudioFrame(pcm.tobytes(), TONE_RATE, 1, samples)


def _rtp_packets(stats: rtc.room.RtcStats) -> tuple[int, int]:
    """Audio RTP packets received from the room and sent to it, per the peer connections."""
    received = sent = 0
    # With one peer connection for both directions (livekit-server 1.13 and
    # this SDK negotiate it), everything is in publisher_stats.
    for stat in [*stats.publisher_stats, *stats.subscriber_stats]:
        kind = stat.WhichOneof("stats")
        if kind == "inbound_rtp" and stat.inbound_rtp.stream.kind == "audio":
            received += stat.inbound_rtp.received.packets_received
        elif kind == "outbound_rtp" and stat.outbound_rtp.stream.kind == "audio":
            sent += stat.outbound_rtp.sent.packets_sent
    return received, sent


@dataclass
class Call:
    """One room with a caller in it: publishes a tone, listens for the agent.

    Verified when an agent participant joined, the caller's peer connection
    receives audio RTP packets from it, and (with a tone) the agent subscribed
    to the tone while the caller's connection sends its packets. Hearing the
    greeting is recorded too; it is not required, because the agent says it
    once, right after it publishes, and on a loaded machine the caller's
    subscription is sometimes set up only after the greeting is over.
    """

    index: int
    room: str
    sid: str = ""
    #: Publish the tone (else the caller only listens).
    tone: bool = True
    agent_joined: anyio.Event = field(default_factory=anyio.Event)
    #: Audio RTP packets arrive from the agent.
    agent_audio: anyio.Event = field(default_factory=anyio.Event)
    #: The agent subscribed to the caller's tone (and the tone's packets go out).
    subscribed: anyio.Event = field(default_factory=anyio.Event)
    tone_sent: anyio.Event = field(default_factory=anyio.Event)
    #: The greeting: ``HEARD_FRAMES`` loud frames of the agent's audio.
    heard: anyio.Event = field(default_factory=anyio.Event)
    leave: anyio.Event = field(default_factory=anyio.Event)
    loud_frames: int = 0
    #: Every agent participant seen in the room (more than one: the session restarted).
    agent_sids: set[str] = field(default_factory=set)
    agent_joined_at: float | None = None
    dispatched_at: float = 0.0
    redispatches: int = 0

    @property
    def verified(self) -> bool:
        tone_ok = not self.tone or (self.subscribed.is_set() and self.tone_sent.is_set())
        return self.agent_joined.is_set() and self.agent_audio.is_set() and tone_ok

    def problem(self) -> str:
        """What is missing, for a log line."""
        missing = [
            name
            for name, done in (
                ("agent joined", self.agent_joined.is_set()),
                ("audio packets from the agent", self.agent_audio.is_set()),
                ("tone subscribed by the agent", self.subscribed.is_set() or not self.tone),
                ("tone packets sent", self.tone_sent.is_set() or not self.tone),
            )
            if not done
        ]
        return "no " + ", no ".join(missing) if missing else "nothing missing"

    async def run(self, creds: LiveKitSettings, *, task_status: TaskStatus[None]) -> None:
        """Join, publish the tone, report started; stay until :attr:`leave`."""
        token = caller_token(creds, self.room, f"caller-{self.index}")
        room = rtc.Room()
        streams: list[rtc.AudioStream] = []
        track_arrived = anyio.Event()

        def is_agent(p: rtc.Participant) -> bool:
            return bool(getattr(p, "kind", None) == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)

        @room.on("participant_connected")
        def _joined(p: rtc.RemoteParticipant) -> None:
            if is_agent(p):
                self.agent_sids.add(p.sid)
                if self.agent_joined_at is None:
                    self.agent_joined_at = time.monotonic()
                self.agent_joined.set()

        @room.on("track_subscribed")
        def _track(track: rtc.Track, _pub: object, p: rtc.RemoteParticipant) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO and is_agent(p) and not streams:
                # Made here, not in the listening task, to miss as little as possible.
                streams.append(rtc.AudioStream(track, sample_rate=16000, num_channels=1))
                track_arrived.set()

        @room.on("local_track_subscribed")
        def _subscribed(_track: rtc.Track) -> None:
            self.subscribed.set()  # the only other participant is the agent

        async def listen() -> None:
            await track_arrived.wait()
            stream = streams[0]
            try:
                async for event in stream:
                    pcm = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.int32)
                    if pcm.size and int(np.abs(pcm).max()) > LOUD:
                        self.loud_frames += 1
                        if self.loud_frames >= HEARD_FRAMES:
                            self.heard.set()
                            return  # stop decoding; the subscription stays
            finally:
                await stream.aclose()

        async def watch_packets() -> None:
            while not (self.agent_audio.is_set() and (self.tone_sent.is_set() or not self.tone)):
                await anyio.sleep(1.0)
                received, sent = _rtp_packets(await room.get_rtc_stats())
                if received > 0:
                    self.agent_audio.set()
                if sent > 0:
                    self.tone_sent.set()

        source = rtc.AudioSource(TONE_RATE, 1)
        frame = _tone_frame()

        async def feed() -> None:
            while True:  # capture_frame waits while the source's 1 s queue is full
                await source.capture_frame(frame)

        try:
            await room.connect(creds.ws_url, token)
            for p in room.remote_participants.values():
                _joined(p)
            if self.tone:
                track = rtc.LocalAudioTrack.create_audio_track("tone", source)
                options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
                await room.local_participant.publish_track(track, options)
            async with anyio.create_task_group() as tg:
                if self.tone:
                    tg.start_soon(feed)
                tg.start_soon(listen)
                tg.start_soon(watch_packets)
                task_status.started()
                await self.leave.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                for stream in streams:
                    await stream.aclose()
                await room.disconnect()
                await source.aclose()


# -- the three workers ---------------------------------------------------------


@dataclass
class Stack:
    livekit: LiveKitServer
    redis: RedisServer
    creds: LiveKitSettings
    log_dir: Path
    concurrency: int
    lease: float = 30.0

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            LIVEKIT_URL=self.creds.ws_url,
            LIVEKIT_API_KEY=self.creds.api_key,
            LIVEKIT_API_SECRET=self.creds.api_secret,
        )
        env.pop("OPENRTC_LOG_LEVEL", None)
        return env


class Target(Protocol):
    key: str
    label: str

    def service(self) -> Service: ...

    async def ready(self, service: Service) -> None: ...

    async def dispatch(self, calls: Sequence[Call]) -> None: ...

    async def redispatch(self, call: Call) -> bool: ...


class OpenRTCTarget:
    """``openrtc worker`` fed by enqueuing its jobs on Redis directly."""

    def __init__(self, stack: Stack, isolation: str) -> None:
        self.stack = stack
        self.isolation = isolation
        self.key = isolation
        self.label = f"openrtc {isolation}"
        self.keys = Keys(f"density-{isolation}-{secrets.token_hex(3)}")

    def service(self) -> Service:
        argv = [
            sys.executable,
            "-m",
            "openrtc",
            "worker",
            "--agent",
            AGENT,
            "--agents-dir",
            str(OFFLINE_AGENTS),
            "--isolation",
            self.isolation,
            "--concurrency",
            str(self.stack.concurrency),
            "--max-queue-age",
            "300",
            "--lease",
            f"{self.stack.lease:g}",
        ]
        env = self.stack.base_env()
        env.update(REDIS_URL=self.stack.redis.url, OPENRTC_NAMESPACE=self.keys.namespace)
        # No /metrics server: a fixed port (8182) collides with any other worker on the
        # machine, and an unscraped server costs nothing measurable.
        env["OPENRTC_HTTP_PORT"] = "0"
        return Service(self.label, argv, env, self.stack.log_dir / f"worker-{self.key}.log")

    async def ready(self, service: Service) -> None:
        """The worker heartbeats once its runner is prepared (the warm child is up)."""
        redis = connect_redis(self.stack.redis.url)
        try:
            with anyio.fail_after(WORKER_READY_TIMEOUT):
                while not await redis.zrange(self.keys.workers(AGENT), 0, -1):
                    service.check_alive()
                    await anyio.sleep(0.2)
        finally:
            await redis.aclose()

    async def dispatch(self, calls: Sequence[Call]) -> None:
        now = time.time()
        messages = []
        for call in calls:
            job_id = f"AJ_{secrets.token_hex(6)}"
            job = proto.Job(
                id=job_id,
                type=proto.JobType.JT_ROOM,
                room=models.Room(sid=call.sid, name=call.room),
            )
            messages.append(
                JobMessage(
                    job=job,
                    agent=AGENT,
                    accept=accept_arguments(job_id, AGENT),
                    livekit_url=self.stack.creds.ws_url,
                    step=0,
                    source="bench",
                    dispatcher_id="",  # no dispatcher: no status events
                    received_at=now,
                    routed_at=now,
                )
            )
        redis = connect_redis(self.stack.redis.url)
        try:
            results = await StreamStore(redis, self.keys).enqueue(messages)
        finally:
            await redis.aclose()
        if any(r.outcome != "queued" for r in results):
            raise BenchError(f"{self.label}: not every job was enqueued: {results}")

    async def redispatch(self, call: Call) -> bool:
        """Nothing to do: a job waits on its stream until the worker has a free slot."""
        return False


class PlainTarget:
    """A plain livekit-agents worker, dispatched explicitly by agent name."""

    key = "plain"
    label = "plain livekit-agents"

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.agent_name = f"{PLAIN_AGENT_NAME}-{secrets.token_hex(3)}"

    def service(self) -> Service:
        argv = [sys.executable, str(PLAIN_WORKER), "start", "--log-level", "INFO"]
        env = self.stack.base_env()
        env["DENSITY_AGENT_NAME"] = self.agent_name
        env["DENSITY_CAPACITY"] = str(self.stack.concurrency)
        return Service(self.label, argv, env, self.stack.log_dir / "worker-plain.log")

    async def ready(self, service: Service) -> None:
        """livekit-agents registers after its warm idle process is up."""
        with anyio.fail_after(WORKER_READY_TIMEOUT):
            while "registered worker" not in service.log_path.read_text(errors="replace"):
                service.check_alive()
                await anyio.sleep(0.2)

    async def dispatch(self, calls: Sequence[Call]) -> None:
        c = self.stack.creds
        async with api.LiveKitAPI(c.http_url, c.api_key, c.api_secret) as lk:
            for call in calls:
                await lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name=self.agent_name, room=call.room)
                )

    async def redispatch(self, call: Call) -> bool:
        """Dispatch again: LiveKit gives a worker ~3 s to accept a job, then drops it.

        On a loaded machine the worker process sometimes answers too late
        (livekit-server logs ``failed to assign job to worker ... context
        deadline exceeded``, ``retry: false``); the job is gone and the room
        would wait forever.
        """
        await self.dispatch([call])
        return True


# -- one worker, level by level ------------------------------------------------


@dataclass
class Result:
    key: str
    label: str
    baseline: Sample | None = None
    levels: dict[int, Sample] = field(default_factory=dict)
    ramp_seconds: dict[int, float] = field(default_factory=dict)
    #: Agent participants that joined a room after its first one (restarted sessions).
    rejoins: int = 0
    #: Calls hung up and replaced because audio never flowed both ways.
    replaced: int = 0
    #: Dispatches repeated because no agent came (LiveKit dropped the job).
    redispatched: int = 0
    #: Greetings heard by the callers of the sessions up at the last level.
    heard: int = 0
    #: The level this worker stopped keeping up at (0: it kept up at every level), and why.
    stopped_at: int = 0
    stop_reason: str = ""

    def cpu_per_session(self, level: int) -> float | None:
        """Marginal CPU per session at ``level``, % of a core: (CPU at N - idle CPU) / N."""
        sample = self.levels.get(level)
        if sample is None or self.baseline is None:
            return None
        return (sample.cpu_percent - self.baseline.cpu_percent) / level

    def calls_per_core(self, level: int) -> float | None:
        """Sessions one core serves at ``level``'s marginal cost: 100 / CPU per session."""
        per = self.cpu_per_session(level)
        return 100 / per if per is not None and per > 0 else None


@dataclass
class Options:
    levels: list[int]
    settle: float
    samples: int
    join_timeout: float | None
    batch: int = 10
    tone: bool = True
    #: CPU use is measured over at least this many seconds (the samples spread out).
    cpu_window: float = 10.0
    #: Where to write a py-spy profile and per-thread CPU of the worker at ``profile_level``
    #: (0: at every level).
    profile_dir: Path | None = None
    profile_level: int = 0


async def settle_and_sample(service: Service, options: Options, *, profile_as: str = "") -> Sample:
    """Wait until the tree's process count is still for ``settle`` s; median of samples.

    The samples are spread over at least ``cpu_window`` seconds: the tree's CPU
    use is its CPU time over that window. ``profile_as`` names the profile
    written over the same window (:func:`profile_worker`), if any.
    """
    still_since = time.monotonic()
    count = -1
    with anyio.move_on_after(SETTLE_LIMIT):
        while time.monotonic() - still_since < options.settle:
            service.check_alive()
            now_count = len(service.remember())
            if now_count != count:
                count, still_since = now_count, time.monotonic()
            await anyio.sleep(0.25)
    interval = max(1.0, options.cpu_window / max(1, options.samples - 1))
    samples = []
    async with anyio.create_task_group() as tg:
        if profile_as and options.profile_dir is not None:
            window = interval * max(1, options.samples - 1)
            tg.start_soon(profile_worker, service, options.profile_dir, profile_as, window)
        for i in range(options.samples):
            if i:
                await anyio.sleep(interval)
            service.check_alive()
            samples.append(await anyio.to_thread.run_sync(service.sample))
    return median_sample(samples)


async def profile_worker(service: Service, out: Path, name: str, seconds: float) -> None:
    """A py-spy profile (raw, collapsed stacks) and per-thread-name CPU of the worker tree.

    py-spy reads the worker's memory from outside (``--nonblocking``: it never
    stops the worker); it runs outside the measured tree but on the same
    cores, so a profiled run's CPU figures are not the headline ones.
    """
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    before = thread_cpu(service.pid)
    started = time.monotonic()
    proc = None
    if await anyio.Path(spy).exists():
        proc = await anyio.open_process(
            [
                spy,
                "record",
                "--pid",
                str(service.pid),
                "--subprocesses",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "50",
                "--duration",
                f"{max(1, int(seconds))}",
                "--output",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    else:
        log("py-spy not found (pip install py-spy): per-thread CPU only")
    await anyio.sleep(seconds)
    after = thread_cpu(service.pid)
    elapsed = time.monotonic() - started
    if proc is not None:
        with anyio.move_on_after(30):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    lines = [f"CPU by thread name over {elapsed:.1f}s, % of a core"]
    usage = {k: 100 * (after.get(k, 0.0) - before.get(k, 0.0)) / elapsed for k in after}
    for key, pct in sorted(usage.items(), key=lambda kv: -kv[1]):
        if pct >= 0.05:
            lines.append(f"{pct:7.1f}  {key}")
    await anyio.Path(out / f"{name}-threads.txt").write_text("\n".join(lines) + "\n")
    log(f"profile of {name} written to {out}")


async def open_calls(stack: Stack, tg: TaskGroup, calls: Sequence[Call]) -> None:
    """Create each room and put its caller in it, a few at a time."""
    c = stack.creds
    limiter = anyio.CapacityLimiter(8)
    async with api.LiveKitAPI(c.http_url, c.api_key, c.api_secret) as lk:

        async def one(call: Call) -> None:
            async with limiter:
                room = await lk.room.create_room(
                    api.CreateRoomRequest(name=call.room, empty_timeout=600)
                )
                call.sid = room.sid
                for attempt in range(1, CALLER_ATTEMPTS + 1):
                    # On a busy machine livekit-rtc sometimes loses the race between
                    # its local_track_published event and publish_track's reply
                    # (a KeyError logged by livekit.rtc.room), and publish_track never
                    # returns. A new attempt reconnects from scratch.
                    with anyio.move_on_after(CALLER_START_TIMEOUT):
                        await tg.start(call.run, c)
                        return
                    if attempt == CALLER_ATTEMPTS:
                        raise BenchError(
                            f"caller {call.index} could not join and publish in room "
                            f"{call.room} in {CALLER_ATTEMPTS} attempts"
                        )
                    log(
                        f"  caller {call.index}: not in its room after "
                        f"{CALLER_START_TIMEOUT:.0f}s; trying again"
                    )

        async with anyio.create_task_group() as opening:
            for call in calls:
                opening.start_soon(one, call)


async def check_rooms(stack: Stack, label: str, calls: Sequence[Call]) -> None:
    """Ask the server: exactly one agent participant, publishing audio, in every room."""
    agent_kind = models.ParticipantInfo.Kind.Value("AGENT")
    audio = models.TrackType.Value("AUDIO")
    c = stack.creds
    problems = []
    agents = 0
    async with api.LiveKitAPI(c.http_url, c.api_key, c.api_secret) as lk:
        for call in calls:
            reply = await lk.room.list_participants(api.ListParticipantsRequest(room=call.room))
            found = [p for p in reply.participants if p.kind == agent_kind]
            agents += len(found)
            callers = [p for p in reply.participants if p.identity == f"caller-{call.index}"]
            if len(found) != 1 or not any(t.type == audio for t in found[0].tracks):
                problems.append(f"{call.room}: {len(found)} agent participant(s)")
            elif not callers:
                problems.append(f"{call.room}: the caller is not in the room")
            elif call.tone and not any(t.type == audio for t in callers[0].tracks):
                problems.append(f"{call.room}: the caller is not publishing its tone")
        rooms = await lk.room.list_rooms(api.ListRoomsRequest())
    ours = {call.room for call in calls}
    strays = [r.name for r in rooms.rooms if r.num_participants and r.name not in ours]
    if problems or agents != len(calls) or strays:
        raise BenchError(
            f"{len(problems)} of {len(calls)} rooms without an agent publishing audio or "
            f"their caller ({agents} agent participants); {'; '.join(problems[:5])}; "
            f"other rooms in use: {', '.join(strays) or 'none'}"
        )


async def delete_rooms(stack: Stack, calls: Sequence[Call]) -> None:
    c = stack.creds
    async with api.LiveKitAPI(c.http_url, c.api_key, c.api_secret) as lk:
        for call in calls:
            if call.sid:
                try:
                    await lk.room.delete_room(api.DeleteRoomRequest(room=call.room))
                except Exception as exc:
                    log(f"could not delete room {call.room}: {exc}")


def _count(calls: Sequence[Call], event: str) -> int:
    return sum(getattr(c, event).is_set() for c in calls)


@dataclass
class Ramp:
    """The calls of one worker's run: adds them a batch at a time, replaces broken ones.

    A call is broken when its agent joined but, ``MEDIA_TIMEOUT`` later, audio
    does not flow both ways (see :class:`Call`): on a loaded machine a WebRTC
    transport now and then never carries media (LiveKit logs ``publish time
    out`` or subscription timeouts for it). Such a call is hung
    up, its room deleted (so its session ends) and a new call dispatched in
    its place; the report counts them. A worker that never sends an agent at
    all is not helped: that fails the run.
    """

    stack: Stack
    target: Target
    options: Options
    service: Service
    tg: TaskGroup
    calls: list[Call] = field(default_factory=list)
    dropped: list[Call] = field(default_factory=list)
    replaced: int = 0
    redispatched: int = 0
    max_replaced: int = 3

    def _new(self, count: int) -> list[Call]:
        first = len(self.calls) + len(self.dropped)
        return [
            Call(
                i,
                f"density-{self.target.key}-{i:03d}-{secrets.token_hex(3)}",
                tone=self.options.tone,
            )
            for i in range(first, first + count)
        ]

    async def _start(self, count: int) -> None:
        new = self._new(count)
        self.calls.extend(new)
        await open_calls(self.stack, self.tg, new)
        await self.target.dispatch(new)
        for call in new:
            call.dispatched_at = time.monotonic()

    async def grow_to(self, level: int) -> None:
        """Add calls a batch at a time; each batch is verified before the next starts."""
        while len(self.calls) < level:
            count = min(self.options.batch, level - len(self.calls))
            await self._start(count)
            await self._verify(self.options.join_timeout or 60.0 + 6.0 * count)

    async def _verify(self, within: float) -> None:
        label = self.target.label
        started = time.monotonic()
        deadline = started + within
        next_report = started + 15
        while not all(c.verified for c in self.calls):
            self.service.check_alive()
            now = time.monotonic()
            for call in list(self.calls):
                if (
                    call.agent_joined_at is None
                    and now - call.dispatched_at > REDISPATCH_AFTER
                    and call.redispatches < MAX_REDISPATCHES
                    and await self.target.redispatch(call)
                ):
                    call.redispatches += 1
                    call.dispatched_at = time.monotonic()
                    self.redispatched += 1
                    deadline = max(deadline, call.dispatched_at + 60.0)
                    log(
                        f"  {label}: no agent in {call.room} {REDISPATCH_AFTER:.0f}s after "
                        "its dispatch; dispatched again"
                    )
                joined = call.agent_joined_at
                if not call.verified and joined is not None and now - joined > MEDIA_TIMEOUT:
                    await self._replace(call)
                    deadline = max(deadline, time.monotonic() + 60.0)
                elif not call.verified and joined is not None:
                    # Never give up on a call that may still be replaced.
                    deadline = max(deadline, joined + MEDIA_TIMEOUT + 5.0)
            state = (
                f"{len(self.calls)} calls: {_count(self.calls, 'agent_joined')} agents joined, "
                f"{_count(self.calls, 'agent_audio')} sending audio, "
                f"{_count(self.calls, 'subscribed')} subscribed to the caller's tone, "
                f"{_count(self.calls, 'heard')} greetings heard"
            )
            if now > deadline:
                unverified = sum(not c.verified for c in self.calls)
                raise BenchError(
                    f"{unverified} of {len(self.calls)} sessions not verified "
                    f"{now - started:.0f}s after the batch started: {state}; "
                    f"worker log {self.service.log_path}:\n{self.service.log_tail()}"
                )
            if now >= next_report:
                log(f"  {label}: {state}")
                next_report = now + 15
            await anyio.sleep(0.2)

    async def _replace(self, call: Call) -> None:
        self.replaced += 1
        problem = call.problem()
        if self.replaced > self.max_replaced:
            raise BenchError(
                f"{self.target.label}: call in {call.room}: {problem} "
                f"{MEDIA_TIMEOUT:.0f}s after its agent joined, and "
                f"{self.max_replaced} calls were replaced already"
            )
        log(
            f"  {self.target.label}: call in {call.room}: {problem} {MEDIA_TIMEOUT:.0f}s "
            f"after its agent joined; hanging up and placing another"
        )
        call.leave.set()
        self.calls.remove(call)
        self.dropped.append(call)
        with anyio.fail_after(30):
            await delete_rooms(self.stack, [call])
        await self._start(1)


async def measure(
    stack: Stack, target: Target, options: Options, result: Result | None = None
) -> Result:
    """One worker, level by level; where it stops keeping up is noted, not raised.

    A level whose sessions cannot all be verified (joins that time out, calls
    without audio, a worker that exits) ends this worker's ramp: the result
    says at which level and why, and the levels below it stand.
    """
    result = result or Result(target.key, target.label)
    service = target.service()
    log(f"{target.label}: starting the worker ({' '.join(service.argv[1:])})")
    service.start()
    ramp: Ramp | None = None
    try:
        async with anyio.create_task_group() as calls_tg:
            ramp = Ramp(
                stack,
                target,
                options,
                service,
                calls_tg,
                max_replaced=max(3, max(options.levels) // 10),
            )
            level = 0
            try:
                started = time.monotonic()
                await target.ready(service)
                log(f"{target.label}: ready after {time.monotonic() - started:.1f}s")
                result.baseline = await settle_and_sample(service, options)
                log(f"{target.label}: idle {_describe(result.baseline)}")
                for level in options.levels:
                    added = level - len(ramp.calls)
                    started = time.monotonic()
                    await ramp.grow_to(level)
                    result.ramp_seconds[level] = time.monotonic() - started
                    profiled = options.profile_level in (0, level)
                    profile = f"{target.key}-{level}" if profiled else ""
                    sample = await settle_and_sample(service, options, profile_as=profile)
                    await check_rooms(stack, target.label, ramp.calls)
                    result.levels[level] = sample
                    result.rejoins = sum(len(c.agent_sids) - 1 for c in ramp.calls)
                    result.replaced = ramp.replaced
                    result.redispatched = ramp.redispatched
                    result.heard = _count(ramp.calls, "heard")
                    log(
                        f"{target.label}: {level} session(s) verified "
                        f"({added} added in {result.ramp_seconds[level]:.1f}s): "
                        f"{_describe(sample)}"
                    )
            except Exception as exc:  # BenchError, or a caller's failure in a task group
                _stopped(result, level, exc)
            finally:
                for call in ramp.calls:
                    call.leave.set()  # callers hang up; the task group waits for them
    except Exception as exc:  # a caller task failed after it had started
        _stopped(result, max(result.levels, default=0), exc)
    finally:
        missing = [lvl for lvl in options.levels if lvl not in result.levels]
        if missing and not result.stopped_at:
            # Seen on an overloaded machine: the ramp ends by a cancellation that
            # surfaces as no exception here. Still a level this worker did not reach.
            result.stopped_at = missing[0]
            result.stop_reason = "its ramp ended before the level was verified (cancelled)"
            log(f"{target.label}: stops keeping up at {missing[0]} sessions: {result.stop_reason}")
        with anyio.CancelScope(shield=True):
            if ramp is not None:
                with anyio.move_on_after(30):
                    await delete_rooms(stack, ramp.calls)  # whatever session is left ends
            await service.stop()
        log(f"{target.label}: stopped")
    return result


def _stopped(result: Result, level: int, exc: Exception) -> None:
    """Note where and why a worker stopped keeping up (the first reason wins)."""
    error = _find(exc, BenchError)
    reason = str(error) if error is not None else f"{type(exc).__name__}: {exc}"
    log(f"{result.label}: stops keeping up at {level} sessions: {reason}")
    if not result.stopped_at:
        result.stopped_at = level
        result.stop_reason = reason.split("\n")[0]


def _describe(s: Sample) -> str:
    return (
        f"RSS {s.rss / MB:.1f} MB, PSS {s.pss / MB:.1f} MB, "
        f"{s.processes} process(es), {s.threads} threads, CPU {s.cpu_percent:.0f}% of a core, "
        f"load {s.load:.1f}"
    )


# -- report ------------------------------------------------------------------


def marginal(
    result: Result, get: Callable[[Sample], int], low: int = 0, high: int = 0
) -> float | None:
    """MB per session between two levels (default: the lowest and highest it reached)."""
    low = low or (min(result.levels) if result.levels else 0)
    high = high or (max(result.levels) if result.levels else 0)
    if high <= low or low not in result.levels or high not in result.levels:
        return None
    return (get(result.levels[high]) - get(result.levels[low])) / (high - low) / MB


LABEL_WIDTH: Final = 34
COLUMN_WIDTH: Final = 22


def table(results: Sequence[Result], title: str, get: Callable[[Sample], int]) -> list[str]:
    lines = [title, f"{'':{LABEL_WIDTH}}" + "".join(f"{r.label:>{COLUMN_WIDTH}}" for r in results)]

    def row(name: str, values: Sequence[str]) -> None:
        lines.append(f"{name:{LABEL_WIDTH}}" + "".join(f"{v:>{COLUMN_WIDTH}}" for v in values))

    def mb(sample: Sample | None) -> str:
        return f"{get(sample) / MB:.1f}" if sample is not None else "-"

    row("baseline (idle worker)", [mb(r.baseline) for r in results])
    levels = sorted({lvl for r in results for lvl in r.levels})
    for level in levels:
        row(
            f"{level} session{'s' if level != 1 else ''}",
            [mb(r.levels.get(level)) for r in results],
        )
    if len(levels) >= 2:
        lo, hi = levels[0], levels[-1]
        values = []
        for r in results:
            m = marginal(r, get)
            reached = max(r.levels, default=0)
            short = f" (to {reached})" if m is not None and reached != hi else ""
            values.append(f"{m:.2f}{short}" if m is not None else "-")
        row(f"marginal MB/session ({hi}-{lo})/{hi - lo}", values)
    return lines


def common_levels(results: Sequence[Result]) -> list[int]:
    """The levels every one of ``results`` kept up at, ascending."""
    if not results:
        return []
    shared = set(results[0].levels)
    for r in results[1:]:
        shared &= set(r.levels)
    return sorted(shared)


def cpu_table(results: Sequence[Result], options: Options) -> list[str]:
    """CPU of each worker tree per level; marginal CPU per session and calls per core."""
    audio = "with caller audio (each caller publishes a tone the agent subscribes to)"
    if not options.tone:
        audio = "callers only listen (no caller audio)"
    lines = [
        f"CPU, % of one core (the worker and all its child processes; {audio}; "
        f"CPU time over {options.cpu_window:.0f}s)",
        f"{'':{LABEL_WIDTH}}" + "".join(f"{r.label:>{COLUMN_WIDTH}}" for r in results),
    ]

    def row(name: str, values: Sequence[str]) -> None:
        lines.append(f"{name:{LABEL_WIDTH}}" + "".join(f"{v:>{COLUMN_WIDTH}}" for v in values))

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return format(value, spec) if value is not None else "-"

    row(
        "baseline (idle worker)",
        [fmt(r.baseline.cpu_percent if r.baseline else None) for r in results],
    )
    levels = sorted({lvl for r in results for lvl in r.levels})
    for level in levels:
        row(
            f"{level} session{'s' if level != 1 else ''}",
            [fmt(r.levels[level].cpu_percent if level in r.levels else None) for r in results],
        )
    for level in levels:
        if level > 1:
            row(
                f"CPU per session at {level}",
                [fmt(r.cpu_per_session(level), ".2f") for r in results],
            )
    for level in levels:
        if level > 1:
            row(
                f"calls per core at {level}", [fmt(r.calls_per_core(level), ".0f") for r in results]
            )
    return lines


def report(results: Sequence[Result], options: Options, elapsed: float) -> bool | None:
    """Print the tables, whatever each worker reached; whether the goals are met.

    Returns None when no goal could be measured (a system missing, or no
    level both sides of a goal kept up at).
    """
    tone = (
        ", the caller's tone subscribed by the agent and its packets sent" if options.tone else ""
    )
    priority = (
        "realtime (SCHED_FIFO) allowed"
        if _has_capability(CAP_SYS_NICE)
        else "normal priority (no CAP_SYS_NICE)"
    )
    print()
    print(
        f"Memory and CPU of one worker serving the offline dental agent (Python "
        f"{platform.python_version()}, livekit-agents {version('livekit-agents')}, livekit "
        f"{version('livekit')}, livekit-server {LIVEKIT_VERSION}; {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 1024**3:.0f} GiB RAM)"
    )
    print(
        f"Callers {'publish a tone (caller audio) and listen' if options.tone else 'only listen'}"
        f"; sessions started {options.batch} at a time; libwebrtc audio threads at {priority}. "
        f"Every session verified: agent joined, its audio packets reach the caller{tone}; the "
        f"server shows one agent participant publishing audio in every room. Median of "
        f"{options.samples} samples after the process count was still for {options.settle:.0f}s."
    )
    print()
    for r in results:
        if r.stopped_at:
            print(f"{r.label}: stops keeping up at {r.stopped_at} sessions: {r.stop_reason}")
    if any(r.stopped_at for r in results):
        print()
    for title, get in (
        ("RSS, MB (summed over the worker and all its child processes)", _rss),
        ("PSS, MB (shared pages divided among the processes sharing them)", _pss),
    ):
        for line in table(results, title, get):
            print(line)
        print()
    for line in cpu_table(results, options):
        print(line)
    print()

    def row(name: str, cell: Callable[[Result], str]) -> None:
        print(f"{name:{LABEL_WIDTH}}" + "".join(f"{cell(r):>{COLUMN_WIDTH}}" for r in results))

    def at_top(fmt: Callable[[Sample], str]) -> Callable[[Result], str]:
        return lambda r: fmt(r.levels[max(r.levels)]) if r.levels else "-"

    print("At the highest level each worker kept up at")
    row("", lambda r: r.label)
    row("sessions", lambda r: f"{max(r.levels, default=0)}")
    row("stops keeping up at", lambda r: f"{r.stopped_at}" if r.stopped_at else "-")
    row("processes", at_top(lambda s: f"{s.processes}"))
    row("threads", at_top(lambda s: f"{s.threads}"))
    row("worker process alone: RSS, MB", at_top(lambda s: f"{s.main_rss / MB:.1f}"))
    row("  anonymous, MB", at_top(lambda s: f"{s.main_anon / MB:.1f}"))
    row("  file-backed, MB", at_top(lambda s: f"{s.main_file / MB:.1f}"))
    row("CPU while sampled, % of a core", at_top(lambda s: f"{s.cpu_percent:.0f}"))
    row("machine load average (1 min)", at_top(lambda s: f"{s.load:.1f}"))
    row("time to start all sessions, s", lambda r: f"{sum(r.ramp_seconds.values()):.0f}")
    row("agents that joined a room twice", lambda r: f"{r.rejoins}")
    row("greetings heard by the callers", lambda r: f"{r.heard}")
    row("calls replaced (no audio)", lambda r: f"{r.replaced}")
    row("dispatches repeated (job lost)", lambda r: f"{r.redispatched}")
    print()

    verdicts = [memory_goal(results, options), cpu_goal(results, options)]
    process_vs_plain(results)
    print(f"run time {elapsed:.0f}s")
    measured = [v for v in verdicts if v is not None]
    return all(measured) if measured else None


def memory_goal(results: Sequence[Result], options: Options) -> bool | None:
    """Coroutine RSS <= process RSS / GOAL at the highest level both kept up at."""
    by_key = {r.key: r for r in results}
    co, pr, plain = by_key.get("coroutine"), by_key.get("process"), by_key.get("plain")
    if not (co and pr):
        return None
    shared = common_levels([co, pr])
    if not shared:
        print("coroutine / process memory: no level both kept up at -> not measured")
        return False
    top = shared[-1]
    short = f" (not {max(options.levels)}: see above)" if top != max(options.levels) else ""
    ratio = co.levels[top].rss / pr.levels[top].rss
    met = ratio <= 1 / GOAL
    print(
        f"coroutine / process, RSS at {top} sessions{short}: {ratio:.3f} "
        f"({1 / ratio:.1f}x less; goal: at most 1/{GOAL:.0f} = {1 / GOAL:.3f}) -> "
        f"{'met' if met else 'MISSED'}"
    )
    print(
        f"coroutine / process, PSS at {top} sessions: {co.levels[top].pss / pr.levels[top].pss:.3f}"
    )
    record_figure(
        "density",
        f"coroutine / process RSS at {top} sessions",
        ours=co.levels[top].rss / MB,
        anchor=pr.levels[top].rss / MB,
        anchor_label="openrtc process isolation",
        unit="MB",
        goal=f"<= {1 / GOAL:.2f}x",
        met=met,
    )
    if plain and top in plain.levels:
        print(
            f"coroutine / plain livekit-agents at {top} sessions: RSS "
            f"{co.levels[top].rss / plain.levels[top].rss:.3f}, PSS "
            f"{co.levels[top].pss / plain.levels[top].pss:.3f}"
        )
    return met


def cpu_goal(results: Sequence[Result], options: Options) -> bool | None:
    """openrtc's calls per core (its better mode) >= CPU_GOAL x plain's, at a shared level."""
    by_key = {r.key: r for r in results}
    plain = by_key.get("plain")
    ours = [r for r in results if r.key in ("coroutine", "process")]
    if plain is None or not ours:
        return None
    audio = "with caller audio" if options.tone else "callers only listening"
    shared = [lvl for lvl in common_levels([plain, *ours]) if lvl > 1]
    if not shared:
        print(f"calls per core ({audio}): no level above 1 every worker kept up at -> not measured")
        record_figure(
            "density",
            f"calls per core, {audio}",
            ours=None,
            anchor=None,
            anchor_label="plain livekit-agents",
            unit="calls",
            goal=f">= {CPU_GOAL:.1f}x",
            met=False,
            note="no level every worker kept up at",
        )
        return False
    level = shared[-1]
    anchor = plain.calls_per_core(level)
    best: tuple[float, Result] | None = None
    for r in ours:
        per_core = r.calls_per_core(level)
        record_figure(
            "density",
            f"CPU per session, {r.label}, {audio}, at {level}",
            ours=r.cpu_per_session(level),
            anchor=plain.cpu_per_session(level),
            anchor_label="plain livekit-agents",
            unit="% core",
            goal="",
            met=None,
        )
        if per_core is not None and (best is None or per_core > best[0]):
            best = (per_core, r)
    if best is None or anchor is None:
        print(f"calls per core ({audio}) at {level}: CPU per session not positive -> not measured")
        return False
    ratio = best[0] / anchor
    met = ratio >= CPU_GOAL
    note = f"{best[1].label} (the better mode), {audio}, at {level} sessions"
    if plain.stopped_at:
        note += f"; plain stops keeping up at {plain.stopped_at}"
    print(
        f"calls per core, {audio}, at {level} sessions: {best[1].label} {best[0]:.0f} (the better "
        f"openrtc mode), plain livekit-agents {anchor:.0f}: {ratio:.2f}x (goal: at least "
        f"{CPU_GOAL:.1f}x) -> {'met' if met else 'MISSED'}"
    )
    record_figure(
        "density",
        "calls per core",
        ours=best[0],
        anchor=anchor,
        anchor_label="plain livekit-agents",
        unit="calls",
        goal=f">= {CPU_GOAL:.1f}x",
        met=met,
        note=note,
    )
    return met


def process_vs_plain(results: Sequence[Result]) -> None:
    """Item 1's figures, for the scoreboard: PSS per session and 50-session start time."""
    by_key = {r.key: r for r in results}
    pr, plain = by_key.get("process"), by_key.get("plain")
    if not (pr and plain):
        return
    shared = common_levels([pr, plain])
    if len(shared) >= 2:
        lo, hi = shared[0], shared[-1]
        ours, anchor = marginal(pr, _pss, lo, hi), marginal(plain, _pss, lo, hi)
        if ours is not None and anchor is not None:
            print(
                f"process isolation PSS per session ({hi}-{lo})/{hi - lo}: {ours:.1f} MB, "
                f"plain livekit-agents {anchor:.1f} MB"
            )
            record_figure(
                "density",
                f"process isolation PSS per session ({lo} to {hi})",
                ours=ours,
                anchor=anchor,
                anchor_label="plain livekit-agents",
                unit="MB",
                goal="< 1.00x",
                met=ours < anchor,
            )
    if 50 in pr.levels and 50 in plain.levels:
        ours_s = sum(v for k, v in pr.ramp_seconds.items() if k <= 50)
        anchor_s = sum(v for k, v in plain.ramp_seconds.items() if k <= 50)
        print(f"50 sessions started in {ours_s:.0f} s (process), {anchor_s:.0f} s (plain)")
        record_figure(
            "density",
            "time to start 50 sessions, process isolation",
            ours=ours_s,
            anchor=anchor_s,
            anchor_label="plain livekit-agents",
            unit="s",
            goal="<= 1.00x",
            met=ours_s <= anchor_s,
        )


def _rss(s: Sample) -> int:
    return s.rss


def _pss(s: Sample) -> int:
    return s.pss


# -- main ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sessions",
        default="auto",
        help="session levels, comma-separated; auto (default): 1, then 5, 10 and 25 per CPU "
        f"({','.join(map(str, auto_levels()))} here)",
    )
    parser.add_argument(
        "--systems",
        default="coroutine,process,plain",
        help="which workers to measure, in order (default coroutine,process,plain)",
    )
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds of quiet before sampling"
    )
    parser.add_argument("--samples", type=int, default=5, help="samples per level, 1 s apart")
    parser.add_argument(
        "--join-timeout",
        type=float,
        default=None,
        help="seconds for a batch's sessions to be verified (default 60 + 6 per session)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=10,
        help="sessions started at a time; each batch is verified before the next (default 10)",
    )
    parser.add_argument(
        "--caller-audio",
        choices=("tone", "listen"),
        default="tone",
        help="callers publish a tone the agent subscribes to (caller audio, the default), "
        "or only listen",
    )
    parser.add_argument(
        "--cpu-window",
        type=float,
        default=10.0,
        help="seconds over which each level's CPU use is measured (default 10)",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        help="write a py-spy profile and per-thread CPU of each worker at --profile-level here",
    )
    parser.add_argument(
        "--profile-level",
        type=int,
        default=0,
        help="the level to profile (default: every level)",
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=30.0,
        help="openrtc workers' --lease, seconds (default 30; openrtc's own default is 5)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 unless coroutine RSS <= process RSS / {GOAL:.0f} and openrtc's calls per "
        f"core (its better mode) >= {CPU_GOAL:.1f}x plain livekit-agents'",
    )
    parser.add_argument("--log-dir", type=Path, help="keep server and worker logs here")
    parser.add_argument(
        "--allow-realtime",
        action="store_true",
        help="keep CAP_SYS_NICE (as root, libwebrtc's audio threads then run SCHED_FIFO)",
    )
    args = parser.parse_args(argv)
    try:
        levels = (
            auto_levels()
            if args.sessions == "auto"
            else sorted({int(x) for x in args.sessions.split(",") if x.strip()})
        )
    except ValueError:
        parser.error("--sessions: auto, or comma-separated integers")
    if not levels or levels[0] < 1:
        parser.error("--sessions: levels must be >= 1")
    args.levels = levels
    args.system_keys = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.system_keys) - {"coroutine", "process", "plain"}
    if unknown or not args.system_keys:
        parser.error(f"--systems: choose from coroutine, process, plain (not {sorted(unknown)})")
    if args.check and not {"coroutine", "process", "plain"} <= set(args.system_keys):
        parser.error("--check needs coroutine, process and plain in --systems")
    if args.cpu_window < 1:
        parser.error("--cpu-window must be >= 1")

    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    return args


async def run(args: argparse.Namespace, stack: Stack, results: list[Result]) -> None:
    """Measure each system in turn; ``results`` fills as levels are measured."""
    options = options_from(args)
    for key in args.system_keys:
        target: Target = PlainTarget(stack) if key == "plain" else OpenRTCTarget(stack, key)
        results.append(Result(target.key, target.label))
        await measure(stack, target, options, results[-1])


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        args.levels,
        args.settle,
        args.samples,
        args.join_timeout,
        batch=args.batch,
        tone=args.caller_audio == "tone",
        cpu_window=args.cpu_window,
        profile_dir=args.profile_dir,
        profile_level=args.profile_level,
    )


def auto_levels(cpus: int | None = None) -> list[int]:
    """Levels sized to the machine: 1, then 5, 10 and 25 sessions per CPU.

    With caller audio a session costs a few % of a core in each of the worker
    and the bench's callers, so the top level loads any machine; a worker
    that stops keeping up there is reported at that level (:func:`measure`).
    """
    n = cpus or os.cpu_count() or 1
    return [1, 5 * n, 10 * n, 25 * n]


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` exception in ``exc``, however deep in exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _raise_interrupt(signum: int, frame: Any) -> None:
    # Once: livekit-rtc SIGTERMs its own process on each FFI panic, and a second
    # one during the cleanup would cut the report short (Ctrl-C still works).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


#: Linux capability number of CAP_SYS_NICE.
CAP_SYS_NICE: Final = 23


def _has_capability(bit: int) -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _drop_realtime() -> None:
    """Re-run this script without CAP_SYS_NICE (see ``--allow-realtime``).

    libwebrtc asks for SCHED_FIFO (priority 49) for every audio encoder and
    audio source thread, two per session, and gets it when the process may
    (root, or CAP_SYS_NICE). Fifty sessions then put a hundred realtime
    threads in the worker and as many in this process's callers; on two busy
    cores they starve every ordinary thread (the worker's event loop, Redis,
    livekit-server) for seconds at a time, and the run measures a collapse
    instead of memory. Without the capability the threads run at normal
    priority, as in a container that runs as non-root. Memory is not affected.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log("setpriv not found: running with realtime audio threads")
        return
    log("re-running without CAP_SYS_NICE: audio threads at normal priority")
    os.execv(
        setpriv,
        [
            setpriv,
            "--bounding-set",
            "-sys_nice",
            "--inh-caps",
            "-sys_nice",
            "--",
            sys.executable,
            *sys.argv,
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.allow_realtime and argv is None and _has_capability(CAP_SYS_NICE):
        _drop_realtime()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up as on Ctrl-C
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="openrtc-density-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    redis = RedisServer()
    livekit = BenchLiveKitServer(log_path=log_dir / "livekit.log")
    started = time.monotonic()
    ok = False
    interrupted = False
    results: list[Result] = []
    try:
        redis.start()
        livekit.start()
        stack = Stack(
            livekit=livekit,
            redis=redis,
            creds=LiveKitSettings(livekit.url, livekit.api_key, livekit.api_secret),
            log_dir=log_dir,
            concurrency=max(args.levels),
            lease=args.lease,
        )
        log(f"servers up: livekit {livekit.url}, redis {redis.url}; logs in {log_dir}")
        anyio.run(run, args, stack, results)
        ok = not any(r.stopped_at for r in results)  # keep the logs of a worker that stopped
    except KeyboardInterrupt:
        log("interrupted")
        interrupted = True
    except BaseException as exc:
        error = _find(exc, BenchError)
        if error is not None:
            log(f"FAILED: {error}")
            return 2
        if _find(exc, KeyboardInterrupt) is not None:
            log("interrupted")
            interrupted = True
        else:
            raise
    finally:
        for service in _SERVICES:
            service.kill()
        livekit.close()
        redis.close()
        if ok and args.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif not ok:
            log(f"logs kept in {log_dir}")
    if interrupted:
        # A SIGTERM, Ctrl-C, or livekit-rtc's FFI panic in this process's callers
        # (it SIGTERMs its own process; seen when an overloaded machine starves them):
        # what was measured so far is still worth printing.
        if any(r.levels for r in results):
            log("interrupted: the levels measured so far")
            report(results, options_from(args), time.monotonic() - started)
        return 130
    verdict = report(results, options_from(args), time.monotonic() - started)
    if args.check and not verdict:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
