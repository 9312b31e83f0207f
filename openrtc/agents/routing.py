"""The six-step pre-connect routing chain: which agent serves a job.

This runs on the dispatcher's hot path, inside LiveKit's ~3 second availability
deadline, once per incoming call. It reads only what the ``Job`` carries before
any connect (job metadata, the job's room snapshot) and follows the table in
docs/dispatcher.md ("Routing"); first match wins:

====  ===========================  =========================================
step  source                       rule
====  ===========================  =========================================
0     custom router                ``@openrtc.router`` function, if one is
                                   registered: its name, or ``None`` (go on)
1     ``job.metadata["agent"]``    JSON object string or mapping
2     ``job.metadata["demo"]``     legacy alias
3     ``job.room.metadata["agent"]``
4     ``job.room.metadata["demo"]``
5     room-name prefix             ``<agent>-`` starts ``job.room.name``; longest wins
6     default                      the first registered agent
====  ===========================  =========================================

Why it is fast: metadata is parsed with orjson (about 6x faster than ``json``
on typical dispatch metadata), a parse is skipped when the text cannot contain
either key, the registry is compiled once into a :class:`RoutingTable`, and the
prefix step walks the room name's dashes from the right with set look-ups, so
its cost does not grow with the number of registered agents.

The custom router (step 0, :class:`Router`) is the author's own code on this
path: a plain function of a :class:`RouteRequest`. It is called inline and
timed; a call over :data:`ROUTER_BUDGET` is logged and counted, an exception
or a name nobody registered is logged once per distinct cause and the chain
decides (docs/dispatcher.md, "Custom router").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from time import perf_counter
from typing import Any, Final, NamedTuple, Protocol, TypeAlias

import orjson

__all__ = [
    "ROUTER_BUDGET",
    "ROUTER_FALLTHROUGH_REASONS",
    "ROUTER_STEP",
    "SHOWN_NAME_MAX",
    "STEP_SOURCES",
    "MetadataKeys",
    "Route",
    "RouteRequest",
    "Router",
    "RouterFunction",
    "RoutingTable",
    "UnknownAgentError",
    "clean_value",
    "explain_route",
    "metadata_object",
    "resolve_agent",
    "shown_name",
    "table_for",
]

logger = logging.getLogger("openrtc.routing")

SOURCE_JOB_METADATA: Final = "job metadata"
SOURCE_ROOM_METADATA: Final = "room metadata"
SOURCE_ROOM_PREFIX: Final = "room name prefix"
SOURCE_DEFAULT: Final = "default fallback"
SOURCE_ROUTER: Final = "custom router"

#: The custom router's step: 0, before the chain's 1-6. An entry's ``step``
#: field has always allowed 0, so workers of any version accept its jobs.
ROUTER_STEP: Final = 0

#: What each step reads, for ``openrtc route`` and the docs.
STEP_SOURCES: Final[Mapping[int, str]] = {
    ROUTER_STEP: "custom router",
    1: 'job metadata "agent" key',
    2: 'job metadata "demo" key',
    3: 'room metadata "agent" key',
    4: 'room metadata "demo" key',
    5: "room name prefix",
    6: "default (first registered agent)",
}

_STEP_SOURCE_LABELS: Final = (
    SOURCE_ROUTER,
    SOURCE_JOB_METADATA,
    SOURCE_JOB_METADATA,
    SOURCE_ROOM_METADATA,
    SOURCE_ROOM_METADATA,
    SOURCE_ROOM_PREFIX,
    SOURCE_DEFAULT,
)

_NO_AGENTS: Final = "No agents are registered in the pool."


#: The longest unknown name quoted whole: the longest name that can be
#: registered (``agents.NAME_PATTERN``), so nothing servable is ever cut.
SHOWN_NAME_MAX: Final = 64


def shown_name(name: str) -> str:
    """``name`` as errors quote it: whole up to :data:`SHOWN_NAME_MAX` characters.

    A longer one (room metadata can hold a megabyte) is cut, with an ellipsis
    and its length: ``<first 64 chars>…(1048576 chars)``.
    """
    if len(name) <= SHOWN_NAME_MAX:
        return name
    return f"{name[:SHOWN_NAME_MAX]}…({len(name)} chars)"


class UnknownAgentError(ValueError):
    """Metadata names an agent that is not registered (a ``ValueError``).

    The message is exactly ``Unknown agent '<name>' requested via <source>.``;
    the attributes carry the same facts for the dead-letter entry. The name is
    requester input of any length, and this message goes to logs, the dead
    letters and LiveKit's ``JS_FAILED``: ``.agent`` and the message hold it
    bounded by :func:`shown_name` (whole when it could be registered at all);
    ``.agent_length`` is its real length.
    """

    def __init__(self, agent: str, step: int, source: str) -> None:
        shown = shown_name(agent)
        super().__init__(f"Unknown agent '{shown}' requested via {source}.")
        self.agent = shown
        self.agent_length = len(agent)
        self.step = step
        self.source = source


class Route(NamedTuple):
    """The outcome of routing one job (immutable; shared between jobs).

    Attributes:
        agent: the registered agent name that serves the job.
        step: which step matched: 0 the custom router, 1-6 the chain (see the
            module docstring).
        source: ``"custom router"``, ``"job metadata"``, ``"room metadata"``,
            ``"room name prefix"`` or ``"default fallback"``.
    """

    agent: str
    step: int
    source: str


class RoutingTable:
    """The registered agent names, compiled once for fast routing.

    Build one whenever the registry changes and pass it to
    :func:`resolve_agent`; a plain sequence of names works too: its table is
    compiled once and cached (see :func:`table_for`). ``router``: the custom
    router consulted before the chain (:attr:`AgentPool.routing_table
    <openrtc.agents.registry.AgentPool.routing_table>` carries the pool's).
    """

    __slots__ = ("_dash_free", "_default", "_max_dashes", "_names", "_router", "_routes", "_set")

    def __init__(self, names: Iterable[str], *, router: Router | None = None) -> None:
        self._router = router
        self._names: tuple[str, ...] = tuple(names)
        self._set: frozenset[str] = frozenset(self._names)
        # Every possible outcome is built up front, so routing a job allocates
        # nothing: one dict look-up both checks registration and yields the Route.
        sources = _STEP_SOURCE_LABELS
        self._routes: tuple[dict[str, Route], ...] = tuple(
            {n: Route(n, step, sources[step]) for n in self._names} for step in range(7)
        )
        self._default: Route | None = self._routes[6][self._names[0]] if self._names else None
        # A name with k dashes can only match a room-name prefix ending at the
        # (k+1)-th dash, so the prefix walk never looks further than this.
        self._max_dashes = max((n.count("-") for n in self._names), default=0)
        self._dash_free = self._max_dashes == 0

    @property
    def names(self) -> tuple[str, ...]:
        """Registered names in registration order."""
        return self._names

    @property
    def router(self) -> Router | None:
        """The custom router consulted before the chain, if any."""
        return self._router

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        router = "" if self._router is None else f", router={self._router.label!r}"
        return f"RoutingTable({list(self._names)!r}{router})"

    def prefix_match(self, room_name: str) -> str | None:
        """The longest registered name ``n`` such that ``room_name`` starts with ``n-``."""
        names = self._set
        if self._dash_free:
            # Common case: no registered name contains a dash, so only the text
            # before the first dash can match.
            cut = room_name.find("-")
            if cut > 0:
                head = room_name[:cut]
                if head in names:
                    return head
            return None
        # Collect candidate cut points left to right (bounded by the longest
        # name's dash count), then test them longest first.
        cuts: list[int] = []
        pos = room_name.find("-")
        while pos != -1 and len(cuts) <= self._max_dashes:
            cuts.append(pos)
            pos = room_name.find("-", pos + 1)
        for cut in reversed(cuts):
            if cut > 0:
                head = room_name[:cut]
                if head in names:
                    return head
        return None


class _RoomLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def metadata(self) -> Any: ...


class _JobLike(Protocol):
    """What routing reads: a protocol ``Job``, or a test fixture shaped like one."""

    @property
    def metadata(self) -> Any: ...
    @property
    def room(self) -> _RoomLike: ...


class RouteRequest(NamedTuple):
    """What a custom router is told about a job: what the dispatcher knows before any connect.

    One argument rather than several, so fields can be added later (at the
    end, with defaults) without breaking a router written today; read it by
    attribute. Immutable (a named tuple: a frozen dataclass cost a microsecond
    more per call to build, on the answer path). The metadata is the text
    LiveKit carries (``""`` when none); :attr:`job_data` and :attr:`room_data`
    parse it.

    Attributes:
        job_metadata: the job's (dispatch) metadata: a SIP dispatch rule's or
            ``create_dispatch``'s ``metadata``.
        room_name: the room's name (a SIP rule's ``roomPrefix`` plus the call).
        room_metadata: the room's metadata when the job was offered.
        agents: the registered agent names, in registration order.
    """

    job_metadata: str
    room_name: str
    room_metadata: str
    agents: tuple[str, ...]

    @property
    def job_data(self) -> Mapping[str, Any]:
        """:attr:`job_metadata` as a JSON object; ``{}`` when it is not one (parsed per access)."""
        return (_parse_object(self.job_metadata) if self.job_metadata else None) or {}

    @property
    def room_data(self) -> Mapping[str, Any]:
        """:attr:`room_metadata` as a JSON object; ``{}`` when it is not one (parsed per access)."""
        return (_parse_object(self.room_metadata) if self.room_metadata else None) or {}


#: A custom router: the name of the agent to serve the job, or ``None`` for the chain.
RouterFunction: TypeAlias = Callable[[RouteRequest], "str | None"]

#: A router call taking longer than this (seconds) is logged and counted as
#: slow. Its answer is still used: the time is spent by then, and a sync
#: function cannot be stopped (docs/dispatcher.md, "Custom router").
ROUTER_BUDGET: Final = 0.010

#: Why the chain decided in the router's place: it raised, it named an agent
#: nobody registered, it returned neither a string nor ``None``.
ROUTER_FALLTHROUGH_REASONS: Final = ("error", "unknown_agent", "not_a_name")

#: Distinct faults a router logs at most (each once): past this, only counted.
ROUTER_FAULTS_LOGGED: Final = 100
#: The longest fault text logged (and remembered) whole.
ROUTER_FAULT_TEXT_MAX: Final = 300


def _as_text(metadata: Any) -> str:
    if isinstance(metadata, str):
        return metadata
    if isinstance(metadata, Mapping):  # test fixtures shaped like a Job
        return orjson.dumps(dict(metadata)).decode()
    return ""


class Router:
    """A registered custom router (step 0) and what it did wrong so far.

    :meth:`pick` calls the function on the answer path. The function's
    exception, or a returned value that is not a registered name, is logged
    once per distinct cause (a router failing on every call must not flood
    the log) and the chain decides; :attr:`fallthroughs` counts every such
    call by reason, :attr:`slow_calls` the calls over :attr:`budget`.
    """

    __slots__ = (
        "_faults_seen",
        "_worst",
        "budget",
        "fallthroughs",
        "function",
        "label",
        "slow_calls",
    )

    def __init__(
        self, function: RouterFunction, label: str, *, budget: float = ROUTER_BUDGET
    ) -> None:
        self.function = function
        #: ``module:function``, as ``openrtc route`` and ``openrtc list`` show it.
        self.label = label
        self.budget = budget
        #: Calls the chain decided because of the router, by reason
        #: (:data:`ROUTER_FALLTHROUGH_REASONS`).
        self.fallthroughs: dict[str, int] = dict.fromkeys(ROUTER_FALLTHROUGH_REASONS, 0)
        self.slow_calls = 0
        self._faults_seen: set[tuple[str, str]] = set()
        self._worst = 0.0

    def __repr__(self) -> str:
        return f"Router({self.label!r})"

    def request(self, job: _JobLike, table: RoutingTable) -> RouteRequest:
        """The router's argument for ``job``."""
        room = job.room
        room_name = room.name
        return RouteRequest(
            _as_text(job.metadata),
            room_name if isinstance(room_name, str) else "",
            _as_text(room.metadata),
            table._names,
        )

    def pick(self, request: RouteRequest, table: RoutingTable) -> Route | None:
        """The router's route for ``request``, or ``None``: the chain decides."""
        started = perf_counter()
        try:
            answer: object = self.function(request)
        except Exception as exc:
            self._timed(started)
            self._fault("error", f"raised {type(exc).__name__}: {exc}", exc)
            return None
        self._timed(started)
        if answer is None:
            return None
        if not isinstance(answer, str):
            self._fault("not_a_name", f"returned a {type(answer).__name__}, not a name or None")
            return None
        route = table._routes[ROUTER_STEP].get(answer.strip())
        if route is None:
            self._fault(
                "unknown_agent", f"returned '{shown_name(answer)}', which is not a registered agent"
            )
        return route

    def explain(self, job: _JobLike, table: RoutingTable) -> tuple[Route | None, str]:
        """What the router says for ``job``, as a line of ``openrtc route``; nothing is logged."""
        where = f"step {ROUTER_STEP}: custom router {self.label}"
        try:
            answer: object = self.function(self.request(job, table))
        except Exception as exc:
            return None, f"{where} raised {type(exc).__name__}: {exc}; the chain decides"
        if answer is None:
            return None, f"{where} returned None: the chain decides"
        if not isinstance(answer, str):
            return None, f"{where} returned a {type(answer).__name__}: the chain decides"
        route = table._routes[ROUTER_STEP].get(answer.strip())
        if route is None:
            return None, f"{where} names '{shown_name(answer)}', NOT registered: the chain decides"
        return route, f"{where} names '{route.agent}', registered"

    def _timed(self, started: float) -> None:
        elapsed = perf_counter() - started
        if elapsed <= self.budget:
            return
        self.slow_calls += 1
        # Logged when it is a new worst by half again: a router that is
        # always slow says so a few times, not once per call.
        if elapsed > self._worst * 1.5:
            self._worst = elapsed
            logger.warning(
                "custom router %s took %.1f ms, over its %.0f ms budget on the answer path "
                "(LiveKit waits for the answer; answers are given one at a time)",
                self.label,
                elapsed * 1e3,
                self.budget * 1e3,
            )

    def _fault(self, reason: str, detail: str, exc: BaseException | None = None) -> None:
        self.fallthroughs[reason] += 1
        # Bounded: an exception's text may quote megabytes of metadata.
        if len(detail) > ROUTER_FAULT_TEXT_MAX:
            detail = f"{detail[:ROUTER_FAULT_TEXT_MAX]}…({len(detail)} chars)"
        key = (reason, detail)
        seen = self._faults_seen
        if key in seen or len(seen) > ROUTER_FAULTS_LOGGED:
            return
        seen.add(key)
        if len(seen) > ROUTER_FAULTS_LOGGED:
            logger.warning(
                "custom router %s: %d distinct faults logged; further ones are only counted",
                self.label,
                ROUTER_FAULTS_LOGGED,
            )
            return
        logger.warning(
            "custom router %s %s; the routing chain decides (logged once)",
            self.label,
            detail,
            exc_info=exc,
        )


def _parse_object(text: str) -> Mapping[str, Any] | None:
    """Parse a JSON object; anything else (non-JSON, scalar, array, null) is None."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson is stricter than the standard library (NaN, integers past
        # 64 bits, lone surrogates). Fall back so that whatever ``json``
        # accepts routes the same way; this path is rare.
        try:
            value = json.loads(text)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


class MetadataKeys(NamedTuple):
    """Keys read from job and room metadata, with their quoted forms (for the fast skip)."""

    keys: tuple[str, ...]
    quoted: tuple[str, ...]

    @classmethod
    def of(cls, *keys: str) -> MetadataKeys:
        return cls(keys, tuple(f'"{key}"' for key in keys))


def metadata_object(metadata: Any, wanted: MetadataKeys) -> Mapping[str, Any] | None:
    """One metadata source (a JSON object string or a mapping) as a mapping, if it may hold
    one of the ``wanted`` keys.

    ``None`` when it holds no JSON object (empty, not JSON, a scalar, an array,
    null), or when its text cannot contain any of the keys. The one reader of
    job and room metadata: the agent's keys here, the tenant's
    (:mod:`openrtc.agents.tenants`) the same way.
    """
    if isinstance(metadata, str):
        if not metadata:
            return None
        # Without a backslash, a JSON key can only appear literally (quoted),
        # so most caller metadata skips the parse entirely.
        if "\\" not in metadata:
            for quoted in wanted[1]:
                if quoted in metadata:
                    break
            else:
                return None
        return _parse_object(metadata)
    if isinstance(metadata, Mapping):
        return metadata
    return None


_ROUTE_KEYS: Final = MetadataKeys.of("agent", "demo")


def clean_value(value: object) -> str | None:
    """A metadata value as a name: a non-blank string, stripped; anything else is ``None``."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped:
            return stripped
    return None


def _from_metadata(metadata: Any, table: RoutingTable, first_step: int) -> Route | None:
    source = metadata_object(metadata, _ROUTE_KEYS)
    if source is None:
        return None
    step = first_step
    name = clean_value(source.get("agent"))
    if name is None:
        step += 1
        name = clean_value(source.get("demo"))
        if name is None:
            return None
    route = table._routes[step].get(name)
    if route is None:
        raise UnknownAgentError(name, step, _STEP_SOURCE_LABELS[step])
    return route


#: Distinct name lists whose compiled table is kept; a process routes for one
#: registry, or a handful while it changes, so a small bound never evicts in use.
TABLE_CACHE_SIZE: Final = 32


@lru_cache(maxsize=TABLE_CACHE_SIZE)
def _cached_table(names: tuple[str, ...]) -> RoutingTable:
    return RoutingTable(names)


# The last list or tuple routed by, as a private copy, with its table: a caller
# passes the same registry job after job, and comparing it to the copy (element
# identity makes that a pointer walk) costs a fifth of hashing a fresh tuple.
_last: tuple[list[str] | tuple[str, ...], RoutingTable] | None = None


def table_for(agents: RoutingTable | Iterable[str]) -> RoutingTable:
    """The compiled table for ``agents``: itself, or a cached one for names.

    Keyed by the names themselves, never by the container's identity, so a
    list changed between calls never routes by its old contents.
    """
    global _last
    if isinstance(agents, RoutingTable):
        return agents
    last = _last
    if last is not None and agents == last[0]:
        return last[1]
    names = tuple(agents)
    table = _cached_table(names)
    if isinstance(agents, list):
        _last = (list(names), table)
    elif isinstance(agents, tuple):
        _last = (names, table)
    return table


def resolve_agent(job: _JobLike, agents: RoutingTable | Iterable[str]) -> Route:
    """Resolve which registered agent serves ``job``: the custom router, then the six steps.

    Args:
        job: a ``livekit.protocol.agent.Job`` (or any object with ``metadata``
            and ``room.name`` / ``room.metadata``; metadata may be a JSON string
            or a mapping).
        agents: registered names in registration order: a
            :class:`RoutingTable`, or any iterable of names (its table is
            compiled on first use and cached by the names). A table's
            :attr:`~RoutingTable.router` is asked first; when it names no
            registered agent (``None``, an exception, an unknown name) the
            chain decides.

    Returns:
        The matching :class:`Route`.

    Raises:
        UnknownAgentError: (a ``ValueError``) job or room metadata names an
            agent that is not registered: ``Unknown agent '<name>' requested
            via job metadata.`` (or ``room metadata``). There is deliberately
            no fallback. (Only the chain raises it: a router's unknown name
            falls through.)
        RuntimeError: no agents are registered.
    """
    table = table_for(agents)
    default = table._default
    if default is None:
        raise RuntimeError(_NO_AGENTS)

    router = table._router
    route: Route | None
    if router is not None:
        route = _resolve_routed(job, table, router, default)
    else:
        route = _from_metadata(job.metadata, table, 1)
        if route is None:
            room = job.room
            route = _from_metadata(room.metadata, table, 3)
            if route is None:
                room_name = room.name
                name = table.prefix_match(room_name) if isinstance(room_name, str) else None
                route = default if name is None else table._routes[5][name]
    if logger.isEnabledFor(logging.INFO):
        logger.info("Resolved agent '%s' via %s.", route.agent, route.source)
    return route


def _resolve_routed(job: _JobLike, table: RoutingTable, router: Router, default: Route) -> Route:
    """:func:`resolve_agent` with a custom router: each field of the job is read
    once, for the router and then the chain (a protobuf field read costs about
    200 ns here, once livekit.rtc is loaded)."""
    metadata = job.metadata
    room = job.room
    room_metadata = room.metadata
    name_value: object = room.name  # a look-alike's may be anything
    room_name = name_value if isinstance(name_value, str) else ""
    request = RouteRequest(
        metadata if isinstance(metadata, str) else _as_text(metadata),
        room_name,
        room_metadata if isinstance(room_metadata, str) else _as_text(room_metadata),
        table._names,
    )
    route = router.pick(request, table)
    if route is None:
        route = _from_metadata(metadata, table, 1) or _from_metadata(room_metadata, table, 3)
    if route is None:
        name = table.prefix_match(room_name)
        route = default if name is None else table._routes[5][name]
    return route


def _describe_source(metadata: Any) -> tuple[str | None, tuple[Any, Any] | None]:
    """Why a metadata source yields nothing, or its raw (agent, demo) values."""
    if isinstance(metadata, Mapping):
        return None, (metadata.get("agent"), metadata.get("demo"))
    if not isinstance(metadata, str) or not metadata.strip():
        return "empty", None
    parsed = _parse_object(metadata)
    if parsed is None:
        return "not a JSON object, ignored", None
    return None, (parsed.get("agent"), parsed.get("demo"))


def _describe_value(key: str, value: Any) -> str:
    if value is None:
        return f'no "{key}" key'
    if not isinstance(value, str):
        return f'"{key}" is {type(value).__name__}, not a string: ignored'
    return f'"{key}" is blank: ignored'


def explain_route(job: _JobLike, agents: RoutingTable | Iterable[str]) -> list[str]:
    """Say, step by step, why the chain reached the route it did.

    For operators (``openrtc route``): one line per step up to the match. The
    outcome is always the one :func:`resolve_agent` gives (a custom router is
    called again, so for one that answers the same job the same way); this is
    slower and never on the hot path.
    """
    table = table_for(agents)
    lines: list[str] = []
    if table._router is not None:
        route, line = table._router.explain(job, table)
        lines.append(line)
        if route is not None:
            return lines
    for first_step, metadata in ((1, job.metadata), (3, job.room.metadata)):
        where = _STEP_SOURCE_LABELS[first_step]
        reason, keys = _describe_source(metadata)
        if keys is None:
            lines.append(f"steps {first_step}-{first_step + 1}: {where} {reason}")
            continue
        for offset, key in enumerate(("agent", "demo")):
            value = keys[offset]
            name = clean_value(value)
            step = first_step + offset
            if name is None:
                lines.append(f"step {step}: {where}: {_describe_value(key, value)}")
                continue
            verdict = "registered" if name in table else "NOT registered: the job is rejected"
            lines.append(f"step {step}: {where} \"{key}\" names '{shown_name(name)}', {verdict}")
            return lines
    room_name = job.room.name
    match = table.prefix_match(room_name) if isinstance(room_name, str) else None
    if match is not None:
        lines.append(f"step 5: room '{room_name}' starts with '{match}-'")
        return lines
    lines.append(f"step 5: no registered '<agent>-' prefix on room '{room_name}'")
    if table.names:
        lines.append(f"step 6: default to the first registered agent, '{table.names[0]}'")
    else:
        lines.append("step 6: no agents are registered")
    return lines
