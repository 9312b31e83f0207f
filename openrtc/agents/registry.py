"""The agent registry: ``@agent_config``, :class:`AgentPool` and directory discovery.

Agents are ordinary ``livekit.agents.Agent`` subclasses. An agents directory
holds one module per agent; discovery imports them in sorted file-name order
(skipping ``_*.py``), and that order is the registration order, hence the
routing chain's default. This matches the ``openrtc`` package on PyPI, so
existing agents directories work unchanged.

Agent names double as Redis stream keys (``<ns>:jobs:<name>``) and room-name
prefixes (``<name>-``), so they are restricted to :data:`NAME_PATTERN`: 1-64
ASCII letters, digits, ``_`` and ``-``, starting and ending with a letter or a
digit. That keeps ``:`` (our key separator), ``{}`` (Redis Cluster hash tags),
white space and anything a shell or a URL would mangle out of them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

from openrtc.agents.observers import Hook, Observer, Observers, marked_hooks
from openrtc.agents.routing import Router, RouterFunction, RoutingTable
from openrtc.errors import AgentBuildError, AgentDiscoveryError, AgentRegistryError

if TYPE_CHECKING:
    from livekit.agents import Agent

__all__ = [
    "NAME_PATTERN",
    "AgentConfig",
    "AgentPool",
    "ProviderValue",
    "Redactor",
    "agent_config",
    "describe_provider",
    "redact_numbers",
    "router",
    "validate_agent_name",
]

logger = logging.getLogger("openrtc.agents")

#: A provider is a plugin object (``openai.LLM(...)``) or a LiveKit inference
#: string such as ``"openai/gpt-4.1-mini"``.
ProviderValue: TypeAlias = str | object
#: A transcript redaction hook: ``(role, text)`` -> the text a report keeps, or ``None``.
Redactor: TypeAlias = Callable[[str, str], "str | None"]

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62}[A-Za-z0-9])?")
_CONFIG_ATTR: Final = "__openrtc_agent_config__"
_ROUTER_ATTR: Final = "__openrtc_router__"
_A = TypeVar("_A", bound=type)
_F = TypeVar("_F", bound=RouterFunction)


def validate_agent_name(name: object) -> str:
    """Return ``name`` stripped, or raise :class:`AgentRegistryError` if it cannot serve."""
    if not isinstance(name, str):
        raise AgentRegistryError(f"Agent name must be a string, got {type(name).__name__}.")
    stripped = name.strip()
    if not NAME_PATTERN.fullmatch(stripped):
        raise AgentRegistryError(
            f"Invalid agent name {name!r}: use 1-64 ASCII letters, digits, '_' or '-', "
            "starting and ending with a letter or digit (it becomes a Redis key and a "
            "room-name prefix)."
        )
    return stripped


@dataclass(frozen=True, slots=True)
class _Decorated:
    name: str | None
    stt: ProviderValue | None
    llm: ProviderValue | None
    tts: ProviderValue | None
    greeting: str | None
    checkpoint: bool = True
    resume_line: str | None = None
    transcript: bool = False
    redact: Redactor | None = None


def agent_config(
    *,
    name: str | None = None,
    stt: ProviderValue | None = None,
    llm: ProviderValue | None = None,
    tts: ProviderValue | None = None,
    greeting: str | None = None,
    checkpoint: bool = True,
    resume_line: str | None = None,
    transcript: bool = False,
    redact: Redactor | None = None,
) -> Callable[[_A], _A]:
    """Name an ``Agent`` subclass and set its providers for directory discovery.

    Without ``name`` the agent is named after its module's file stem. Providers
    left as ``None`` fall back to the pool's defaults. The class is returned
    unchanged.

    ``checkpoint=False``: its conversations are not saved, so a takeover
    starts them afresh (greeting included). ``resume_line``: said instead of
    nothing when a session resumes a taken-over conversation ("Sorry, I lost
    you for a second."); the greeting is never said twice.

    ``transcript=True``: the call's report keeps what was said, each line
    through ``redact(role, text)`` first (its return is kept; ``None`` drops
    the line). Without ``redact``, :func:`redact_numbers` masks long digit runs.
    """
    if name is not None:
        name = validate_agent_name(name)
    if greeting is not None:
        if not isinstance(greeting, str):
            raise AgentRegistryError("greeting must be a string.")
        greeting = greeting.strip() or None
    resume_line = _optional_line(resume_line, "resume_line")
    marker = _Decorated(
        name=name,
        stt=stt,
        llm=llm,
        tts=tts,
        greeting=greeting,
        checkpoint=bool(checkpoint),
        resume_line=resume_line,
        transcript=bool(transcript),
        redact=_redactor(redact),
    )

    def decorate(cls: _A) -> _A:
        setattr(cls, _CONFIG_ATTR, marker)
        return cls

    return decorate


#: Runs of digits this long or longer are masked by :func:`redact_numbers`:
#: card, account and phone numbers, not party sizes or times.
_LONG_NUMBER: Final = re.compile(r"\d(?:[\s-]?\d){5,}")


def redact_numbers(role: str, text: str) -> str | None:
    """The default transcript redaction: runs of 6+ digits (spaces or dashes between) masked."""
    return _LONG_NUMBER.sub(lambda m: "#" * len(m.group()), text)


def _redactor(redact: Redactor | None) -> Redactor | None:
    if redact is not None and not callable(redact):
        raise AgentRegistryError("redact must be a function (role, text) -> str | None.")
    return redact


def router(function: _F) -> _F:
    """Mark ``function`` as the agents directory's custom router (routing step 0).

    Discovery registers it; it is called for every offered job, before the
    six-step chain, with a :class:`~openrtc.agents.routing.RouteRequest`
    (job metadata, room name, room metadata, the agent names) and returns
    the name of the agent to serve the job, or ``None`` to let the chain
    decide. An exception or a name that is not registered is logged once and
    the chain decides. It runs on the dispatcher's answer path, so it must be
    a plain, fast function (no I/O: load lookup tables at import).

        @openrtc.router
        def by_dialled_number(request: RouteRequest) -> str | None:
            return NUMBERS.get(request.job_data.get("dialled"))

    The function is returned unchanged. At most one per agents directory.
    """
    _check_router(function)
    setattr(function, _ROUTER_ATTR, True)
    return function


def _check_router(function: object) -> None:
    if not callable(function) or isinstance(function, type):
        raise AgentRegistryError(f"@router marks a function, not {function!r}.")
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        raise AgentRegistryError(
            f"Router {_function_label(function)} is async: a router runs on the answer path "
            "and must be a plain function (load what it looks up at import)."
        )


def _function_label(function: Any, path: Path | None = None) -> str:
    """``module:function``: the file's stem for discovered modules (as their author names them)."""
    module = path.stem if path is not None else getattr(function, "__module__", "?")
    return f"{module}:{getattr(function, '__qualname__', repr(function))}"


def _optional_line(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AgentRegistryError(f"{what} must be a string.")
    return value.strip() or None


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """One registered agent: its name, class and effective providers."""

    name: str
    agent_cls: type[Agent]
    stt: ProviderValue | None = None
    llm: ProviderValue | None = None
    tts: ProviderValue | None = None
    greeting: str | None = None
    session_kwargs: Mapping[str, Any] = field(default_factory=dict)
    source_path: Path | None = None
    #: Called once per worker process before its first session, with the
    #: livekit-agents ``JobProcess`` (load VAD models into ``proc.userdata``).
    #: Discovered from a module-level ``prewarm(proc)`` function.
    prewarm: Callable[[Any], Any] | None = None
    #: Save this agent's conversations so a takeover resumes them (see openrtc.store.checkpoint).
    checkpoint: bool = True
    #: Said when a session resumes a conversation, instead of the greeting.
    resume_line: str | None = None
    #: Keep the transcript in the call's report (through :attr:`redact`).
    transcript: bool = False
    #: ``redact(role, text)``: what the report keeps of a line (``None``: nothing).
    redact: Redactor | None = None

    @property
    def class_label(self) -> str:
        """``file.py:Class`` for discovered agents, ``module:Class`` otherwise."""
        where = self.source_path.name if self.source_path else self.agent_cls.__module__
        return f"{where}:{self.agent_cls.__qualname__}"

    def build(self) -> Agent:
        """An instance of the agent's class, built without arguments as sessions build it.

        Raises :class:`AgentBuildError` (one line: the agent, its class, the
        error) when the constructor raises.
        """
        try:
            return self.agent_cls()  # type: ignore[call-arg]
        except Exception as exc:
            raise AgentBuildError(
                f"Agent '{self.name}' ({self.class_label}) cannot be built: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def describe(self) -> dict[str, str | None]:
        """A JSON-ready summary, as ``openrtc list --json`` prints it."""
        return {
            "name": self.name,
            "class": self.class_label,
            "stt": describe_provider(self.stt),
            "llm": describe_provider(self.llm),
            "tts": describe_provider(self.tts),
            "greeting": self.greeting,
        }


def describe_provider(value: ProviderValue | None) -> str | None:
    """A short, secret-free label for a provider: the string, or ``module.Class(model)``."""
    if value is None or isinstance(value, str):
        return value
    cls = type(value)
    module = cls.__module__.removeprefix("livekit.plugins.")
    label = f"{module.split('.')[0]}.{cls.__qualname__}"
    model = getattr(value, "model", None)
    return f"{label}({model})" if isinstance(model, str) and model else label


class AgentPool:
    """The registered agents, in registration order.

    Register explicitly with :meth:`add` or from a directory with
    :meth:`discover`; routing asks the pool through :meth:`resolve`. Provider
    defaults apply to every agent that leaves a provider unset.
    """

    def __init__(
        self,
        *,
        default_stt: ProviderValue | None = None,
        default_llm: ProviderValue | None = None,
        default_tts: ProviderValue | None = None,
        default_greeting: str | None = None,
    ) -> None:
        self._defaults = (default_stt, default_llm, default_tts, default_greeting)
        self._agents: dict[str, AgentConfig] = {}
        self._router: Router | None = None
        self._table: RoutingTable | None = None
        self._observers: list[Observer] = []

    @classmethod
    def from_directory(cls, agents_dir: str | Path, **defaults: Any) -> AgentPool:
        """A pool holding every agent discovered in ``agents_dir``."""
        pool = cls(**defaults)
        pool.discover(agents_dir)
        return pool

    def add(
        self,
        name: str,
        agent_cls: type[Agent],
        *,
        stt: ProviderValue | None = None,
        llm: ProviderValue | None = None,
        tts: ProviderValue | None = None,
        greeting: str | None = None,
        session_kwargs: Mapping[str, Any] | None = None,
        source_path: str | Path | None = None,
        prewarm: Callable[[Any], Any] | None = None,
        checkpoint: bool = True,
        resume_line: str | None = None,
        transcript: bool = False,
        redact: Redactor | None = None,
    ) -> AgentConfig:
        """Register ``agent_cls`` under ``name`` and return its configuration.

        Raises:
            AgentRegistryError: the name is invalid or taken, or ``agent_cls``
                is not a ``livekit.agents.Agent`` subclass.
        """
        name = validate_agent_name(name)
        if name in self._agents:
            existing = self._agents[name]
            where = ""
            if existing.source_path is not None:
                where = f" (from {existing.source_path.name}"
                if source_path is not None:
                    where += f"; again in {Path(source_path).name}"
                where += ")"
            raise AgentRegistryError(f"Agent '{name}' is already registered{where}.")
        config = self._config(
            name,
            agent_cls,
            stt=stt,
            llm=llm,
            tts=tts,
            greeting=greeting,
            session_kwargs=session_kwargs,
            source_path=source_path,
            prewarm=prewarm,
            checkpoint=checkpoint,
            resume_line=resume_line,
            transcript=transcript,
            redact=redact,
        )
        self._agents[name] = config
        self._table = None
        return config

    def _config(
        self,
        name: str,
        agent_cls: type[Agent],
        *,
        stt: ProviderValue | None,
        llm: ProviderValue | None,
        tts: ProviderValue | None,
        greeting: str | None,
        session_kwargs: Mapping[str, Any] | None,
        source_path: str | Path | None,
        prewarm: Callable[[Any], Any] | None,
        checkpoint: bool,
        resume_line: str | None,
        transcript: bool = False,
        redact: Redactor | None = None,
    ) -> AgentConfig:
        """``agent_cls`` as the agent ``name``, the pool's defaults where unset (validated)."""
        from livekit.agents import Agent

        from openrtc.agents.compat import resolve_provider

        if not (isinstance(agent_cls, type) and issubclass(agent_cls, Agent)):
            raise AgentRegistryError(
                f"Agent '{name}': {agent_cls!r} is not a livekit.agents.Agent subclass."
            )
        if greeting is not None:
            if not isinstance(greeting, str):
                raise AgentRegistryError(f"Agent '{name}': greeting must be a string.")
            greeting = greeting.strip() or None

        d_stt, d_llm, d_tts, d_greeting = self._defaults
        config = AgentConfig(
            name=name,
            agent_cls=agent_cls,
            stt=resolve_provider(d_stt if stt is None else stt),
            llm=resolve_provider(d_llm if llm is None else llm),
            tts=resolve_provider(d_tts if tts is None else tts),
            greeting=d_greeting if greeting is None else greeting,
            session_kwargs=dict(session_kwargs or {}),
            source_path=None if source_path is None else Path(source_path).resolve(),
            prewarm=prewarm,
            checkpoint=bool(checkpoint),
            resume_line=_optional_line(resume_line, f"Agent '{name}': resume_line"),
            transcript=bool(transcript),
            redact=_redactor(redact),
        )
        return config

    def set_router(self, function: RouterFunction | None, *, label: str | None = None) -> None:
        """Make ``function`` the pool's custom router (``None``: no router).

        ``label``: how ``openrtc route`` and ``list`` name it (default
        ``module:function``). Discovery calls this for the ``@router``
        function of an agents directory.

        Raises:
            AgentRegistryError: ``function`` is async or not a function, or
                the pool already has another router (both are named).
        """
        if function is None:
            self._router = None
            self._table = None
            return
        _check_router(function)
        label = label or _function_label(function)
        current = self._router
        # The same module:function again (a module imported anew, as a reload
        # does) replaces it; another function is a second router.
        if current is not None and current.function is not function and current.label != label:
            raise AgentRegistryError(
                f"Two routers: {current.label} and {label}; an agents directory has at most one."
            )
        self._router = Router(function, label)
        self._table = None

    def add_observer(
        self, function: Callable[..., Any], hook: Hook, *, label: str | None = None
    ) -> None:
        """Register ``function`` as an ``on_session_<hook>`` observer (after those there are).

        ``label``: how logs name it (default ``module:function``). Discovery
        calls this for the ``@on_session_start`` / ``@on_session_end``
        functions of an agents directory. The same function (or ``module:function``,
        imported anew) registered again for the same hook replaces its entry.
        """
        if not callable(function) or isinstance(function, type):
            raise AgentRegistryError(f"An observer is a function, not {function!r}.")
        if hook not in ("start", "end"):
            raise AgentRegistryError(f"Unknown observer hook {hook!r}: 'start' or 'end'.")
        label = label or _function_label(function)
        observer = Observer(function, hook, label)
        for i, known in enumerate(self._observers):
            if known.hook == hook and (known.function is function or known.label == label):
                self._observers[i] = observer
                return
        self._observers.append(observer)

    @property
    def observers(self) -> Observers:
        """The pool's session observers, each hook's in registration order."""
        return Observers(
            start=tuple(o for o in self._observers if o.hook == "start"),
            end=tuple(o for o in self._observers if o.hook == "end"),
        )

    @property
    def router(self) -> Router | None:
        """The custom router consulted before the chain, if one is registered."""
        return self._router

    def discover(self, agents_dir: str | Path) -> list[AgentConfig]:
        """Import every agent module of ``agents_dir`` and register its agent.

        Modules load in sorted file-name order, skipping ``_*.py`` and hidden
        files (editor lock files); the directory is put at the end of
        ``sys.path``, so agents import helper modules beside them by name.
        Each must define one local ``Agent`` subclass (or mark one with
        ``@agent_config``), or the directory's ``@router`` function, or
        session observers (``@on_session_start`` / ``@on_session_end``,
        registered in file and definition order), or several of these.
        All or nothing: if any
        module fails, the pool is left as it was. A directory without agent
        modules registers nothing; whoever needs an agent then says so (the
        routing chain raises "No agents are registered in the pool.").

        Raises:
            AgentDiscoveryError: the directory is missing, a module fails to
                import, or defines no agent.
            AgentRegistryError: two modules yield the same agent name, a
                file stem is not a valid name, or two ``@router`` functions
                are defined (both are named).
        """
        directory = Path(agents_dir).expanduser()
        if not directory.is_dir():
            what = "is not a directory" if directory.exists() else "does not exist"
            raise AgentDiscoveryError(f"Agents directory {str(directory)!r} {what}.")
        paths = sorted(p for p in directory.glob("*.py") if not p.name.startswith(("_", ".")))
        if not paths:
            logger.warning("Agents directory %s holds no agent modules (*.py).", directory)
        _importable(directory)
        before = dict(self._agents), self._router, list(self._observers)
        try:
            return self._discover_paths(paths)
        except BaseException:
            self._agents, self._router, self._observers = before
            self._table = None
            raise

    def _discover_paths(self, paths: list[Path]) -> list[AgentConfig]:
        added = []
        for path in paths:
            module = _import_file(path)
            routers = _routers_of(module)
            for function in routers:
                own = getattr(function, "__module__", None) == module.__name__
                self.set_router(function, label=_function_label(function, path if own else None))
            observers = _observers_of(module)
            for function, hook in observers:
                own = getattr(function, "__module__", None) == module.__name__
                label = _function_label(function, path if own else None)
                self.add_observer(function, hook, label=label)
            if (routers or observers) and not _has_agent_class(module):
                continue  # a module for the router or the observers alone
            name, agent_cls, options = _registration(module, path)
            added.append(self.add(name, agent_cls, **options))
            logger.debug("Discovered agent '%s' (%s) in %s.", name, agent_cls.__name__, path)
        return added

    def reload(self, name: str) -> AgentConfig:
        """Import agent ``name``'s module again from its file; its new configuration.

        What the module's file says now replaces the registered agent (class,
        providers, greeting, ``prewarm``); sessions already built keep the
        objects they have. All or nothing: a module that fails to import, no
        longer defines an agent, or now names another agent leaves the
        registered agent (and its module in ``sys.modules``) as it was.

        Raises:
            AgentDiscoveryError: the module fails to import or defines no agent.
            AgentRegistryError: the agent was not discovered from a file, or
                its module now registers another name (a rename needs a restart).
        """
        old = self.get(name)
        path = old.source_path
        if path is None:
            raise AgentRegistryError(f"Agent '{name}' was not discovered from a file.")
        previous = sys.modules.get(_module_name(path))
        try:
            found, agent_cls, options = _registration(_import_file(path, fresh=True), path)
            if found != name:
                raise AgentRegistryError(
                    f"{path.name} now registers agent '{found}', not '{name}': "
                    "renaming an agent needs a restart."
                )
            config = self._config(name, agent_cls, **options)
        except BaseException:
            if previous is not None:
                sys.modules[_module_name(path)] = previous
            raise
        self._agents[name] = config
        self._table = None
        return config

    def get(self, name: str) -> AgentConfig:
        """The configuration of a registered agent; ``KeyError`` if unknown."""
        try:
            return self._agents[name]
        except KeyError:
            raise KeyError(f"Unknown agent '{name}'.") from None

    def list_agents(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._agents)

    @property
    def routing_table(self) -> RoutingTable:
        """The registry and its router, compiled for routing (:func:`resolve_agent`)."""
        if self._table is None:
            self._table = RoutingTable(self._agents, router=self._router)
        return self._table

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def __iter__(self) -> Iterator[AgentConfig]:
        return iter(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)


def _registration(module: ModuleType, path: Path) -> tuple[str, type[Agent], dict[str, Any]]:
    """The agent an imported agent module registers: its name, class and options."""
    agent_cls = _agent_class_of(module, path)
    prewarm = getattr(module, "prewarm", None)
    marker: _Decorated | None = agent_cls.__dict__.get(_CONFIG_ATTR)
    if marker is None:
        marker = _Decorated(None, None, None, None, None)
    if marker.name is None:
        try:
            name = validate_agent_name(path.stem)
        except AgentRegistryError as exc:
            raise AgentRegistryError(
                f"{path.name}: {exc} Rename the file or set @agent_config(name=...)."
            ) from None
    else:
        name = marker.name
    options: dict[str, Any] = {
        "stt": marker.stt,
        "llm": marker.llm,
        "tts": marker.tts,
        "greeting": marker.greeting,
        "session_kwargs": None,
        "source_path": path,
        "prewarm": prewarm if callable(prewarm) else None,
        "checkpoint": marker.checkpoint,
        "resume_line": marker.resume_line,
        "transcript": marker.transcript,
        "redact": marker.redact,
    }
    return name, agent_cls, options


def _importable(directory: Path) -> None:
    """Helper modules beside the agents (``_prompts.py``, ``tools/``) importable by name.

    Appended, not prepended: a helper never shadows an installed module.
    """
    entry = str(directory.resolve())
    if entry not in sys.path:
        sys.path.append(entry)


def _module_name(path: Path) -> str:
    resolved = path.resolve()
    # A stable, unique module name per file: two directories may both hold
    # dental.py, and re-discovering the same file must not import it twice.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    return f"openrtc_agents.{resolved.stem}_{digest}"


def _import_file(path: Path, *, fresh: bool = False) -> ModuleType:
    """The module of an agent file, imported once (``fresh``: from the file again)."""
    resolved = path.resolve()
    module_name = _module_name(resolved)
    existing = sys.modules.get(module_name)
    if existing is not None and not fresh:
        return existing
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise AgentDiscoveryError(f"Cannot import agent module {path.name}.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, SystemExit):
            raise AgentDiscoveryError(
                f"Agent module {path.name} called sys.exit({exc.code!r}) while importing."
            ) from None
        if not isinstance(exc, Exception):
            raise
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SyntaxError) and exc.lineno:
            detail = f"SyntaxError: {exc.msg} (line {exc.lineno})"
        raise AgentDiscoveryError(f"Failed to import agent module {path.name}: {detail}") from exc
    return module


def _routers_of(module: ModuleType) -> list[Any]:
    """The ``@router`` functions in the module's namespace, its own or imported (a
    shared one imported by several modules is one router)."""
    return list(
        dict.fromkeys(
            value
            for value in vars(module).values()
            if callable(value) and getattr(value, _ROUTER_ATTR, False) is True
        )
    )


def _observers_of(module: ModuleType) -> list[tuple[Any, Hook]]:
    """The ``@on_session_start`` / ``@on_session_end`` functions in the module's
    namespace, in definition order (its own or imported: one function, once)."""
    found: list[tuple[Any, Hook]] = []
    seen: set[int] = set()
    for value in vars(module).values():
        hooks = marked_hooks(value)
        if hooks and id(value) not in seen:
            seen.add(id(value))
            found.extend((value, hook) for hook in ("start", "end") if hook in hooks)
    return found


def _has_agent_class(module: ModuleType) -> bool:
    from livekit.agents import Agent

    return any(
        isinstance(value, type)
        and issubclass(value, Agent)
        and value is not Agent
        and value.__module__ == module.__name__
        for value in vars(module).values()
    )


def _agent_class_of(module: ModuleType, path: Path) -> type[Agent]:
    """The module's agent: the decorated one, the only one, or the most derived."""
    from livekit.agents import Agent

    # dict.fromkeys: a class bound to two names (``Default = MyAgent``) is one agent.
    local = list(
        dict.fromkeys(
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, Agent)
            and value is not Agent
            and value.__module__ == module.__name__
        )
    )
    if not local:
        raise AgentDiscoveryError(
            f"Agent module {path.name} defines no livekit.agents.Agent subclass."
        )
    decorated = [c for c in local if _CONFIG_ATTR in c.__dict__]
    if len(decorated) == 1:
        return decorated[0]
    candidates = decorated or local
    # Helper base classes in the same file are common; the agent is the leaf.
    leaves = [c for c in candidates if not any(o is not c and issubclass(o, c) for o in candidates)]
    if len(leaves) == 1:
        return leaves[0]
    names = ", ".join(sorted(c.__name__ for c in leaves))
    raise AgentDiscoveryError(
        f"Agent module {path.name} defines several agents ({names}); "
        "mark the one to register with @agent_config."
    )
