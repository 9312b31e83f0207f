"""The tenants file's checks (pure): one row per error class, each its exact line.

And what a valid file becomes: typed entries, references (never values), the
default tenant's entry for tenants the file does not list, the overrides on an
agent's configuration, credentials resolved from the environment or a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from livekit.agents import Agent

import openrtc
from openrtc.agents.offline import OfflineLLM, ToneTTS
from openrtc.agents.registry import AgentConfig
from openrtc.agents.tenants import (
    Breaker,
    CredentialError,
    Reference,
    TenantConfig,
    TenantsConfig,
    TenantSettings,
    tenant_settings_scope,
)
from openrtc.session.session import with_tenant
from openrtc.tenant_file import (
    TenantsError,
    find_tenants_file,
    load_tenants,
    parse_tenants,
    reference_problems,
)

pytestmark = pytest.mark.unit

F = "t.toml"
A = f"{F}: tenant 'acme'"
SECRET = "sk-live-0123456789abcdef"

#: (file text, the exact error lines): one row per error class.
ERRORS: list[tuple[str, str, list[str]]] = [
    (
        "not TOML",
        "[tenants.acme\n",
        [
            f"{F}: not valid TOML: Expected ']' at the end of a table declaration "
            "(at line 1, column 14)"
        ],
    ),
    (
        "unknown top-level key",
        "version = 2\n",
        [f"{F}: unknown key 'version' (each tenant is a [tenants.<name>] table)"],
    ),
    (
        "tenants not a table",
        "tenants = 3\n",
        [f"{F}: tenants: must be a table of [tenants.<name>] tables"],
    ),
    (
        "tenant not a table",
        '[tenants]\nacme = "x"\n',
        [f"{A}: must be a table ([tenants.acme])"],
    ),
    (
        "bad tenant name",
        '[tenants."a b"]\n',
        [
            f"{F}: tenant 'a b': not a tenant name (1-64 letters, digits, '.', '_', '-', "
            "starting and ending with a letter or digit)"
        ],
    ),
    (
        "unknown tenant key",
        '[tenants.acme]\ngretting = "Hi"\n',
        [
            f"{A}: unknown key 'gretting' (known: stt, llm, tts, greeting, credentials, "
            "max_sessions, max_sessions_per_agent, over_cap, breaker)"
        ],
    ),
    (
        "provider not a string",
        "[tenants.acme]\nllm = 4\n",
        [f'{A}: llm: must be a provider string ("openai/gpt-4.1-mini"), not a number'],
    ),
    (
        "blank provider",
        '[tenants.acme]\ntts = "  "\n',
        [f"{A}: tts: must not be blank (leave the key out to keep the agent's)"],
    ),
    (
        "greeting not a string",
        "[tenants.acme]\ngreeting = true\n",
        [f"{A}: greeting: must be a string, not a boolean"],
    ),
    (
        "cap out of bounds",
        "[tenants.acme]\nmax_sessions = 0\n",
        [f"{A}: max_sessions: must be at least 1 and at most 1000000, not 0"],
    ),
    (
        "cap not whole",
        "[tenants.acme]\nmax_sessions_per_agent = 2.5\n",
        [f"{A}: max_sessions_per_agent: must be a whole number, not 2.5"],
    ),
    (
        "cap not a number",
        '[tenants.acme]\nmax_sessions = "10"\n',
        [f"{A}: max_sessions: must be a number, not a string"],
    ),
    (
        "over_cap unknown",
        '[tenants.acme]\nover_cap = "drop"\n',
        [f"{A}: over_cap: must be 'wait' or 'reject', not 'drop'"],
    ),
    (
        "breaker threshold out of bounds",
        "[tenants.acme.breaker]\nfailure_ratio = 1.5\n",
        [f"{A}: breaker.failure_ratio: must be more than 0 and at most 1, not 1.5"],
    ),
    (
        "breaker window out of bounds",
        "[tenants.acme.breaker]\nwindow = 0\n",
        [f"{A}: breaker.window: must be at least 1 and at most 86400 seconds, not 0"],
    ),
    (
        "unknown breaker key",
        "[tenants.acme.breaker]\nratio = 0.5\n",
        [
            f"{A}: breaker: unknown key 'ratio' "
            "(known: failure_ratio, min_sessions, window, cooldown)"
        ],
    ),
    (
        "breaker not a table",
        "[tenants.acme]\nbreaker = 1\n",
        [f"{A}: breaker: must be a table ([tenants.<name>.breaker])"],
    ),
    (
        "credentials not a table",
        '[tenants.acme]\ncredentials = "env:X"\n',
        [f"{A}: credentials: must be a table ([tenants.<name>.credentials])"],
    ),
    (
        "literal secret",
        f'[tenants.acme.credentials]\nOPENAI_API_KEY = "{SECRET}"\n',
        [
            f"{A}: credentials.OPENAI_API_KEY: a literal secret is not allowed in the tenants "
            'file; write a reference: "env:VAR" or "file:/path"'
        ],
    ),
    (
        "literal secret with a colon",
        '[tenants.acme.credentials]\nK = "vault:abc"\n',
        [
            f"{A}: credentials.K: a literal secret is not allowed in the tenants "
            'file; write a reference: "env:VAR" or "file:/path"'
        ],
    ),
    (
        "credential not a string",
        "[tenants.acme.credentials]\nK = 1234\n",
        [f'{A}: credentials.K: must be a reference ("env:VAR" or "file:/path"), not a number'],
    ),
    (
        "bad credential name",
        '[tenants.acme.credentials]\n"my key" = "env:X"\n',
        [
            f"{A}: credentials.my key: not a credential name "
            "(a letter or '_', then letters, digits, '_')"
        ],
    ),
    (
        "bad env name",
        '[tenants.acme.credentials]\nK = "env:A-B"\n',
        [f"{A}: credentials.K: env: must name an environment variable, not 'A-B'"],
    ),
    (
        "the service's own secret",
        '[tenants.acme.credentials]\nK = "env:LIVEKIT_API_SECRET"\n',
        [f"{A}: credentials.K: env:LIVEKIT_API_SECRET is the service's own secret, not a tenant's"],
    ),
    (
        "relative file",
        '[tenants.acme.credentials]\nK = "file:keys/acme"\n',
        [f"{A}: credentials.K: file: must be an absolute path, not 'keys/acme'"],
    ),
    (
        "several problems: one line each",
        '[tenants.acme]\nmax_sessions = -1\nover_cap = 3\n[tenants.beta]\nllm = ""\n',
        [
            f"{A}: max_sessions: must be at least 1 and at most 1000000, not -1",
            f"{A}: over_cap: must be 'wait' or 'reject', not a number",
            f"{F}: tenant 'beta': llm: must not be blank (leave the key out to keep the agent's)",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "lines"), [(t, ls) for _, t, ls in ERRORS], ids=[n for n, _, _ in ERRORS]
)
def test_each_problem_is_one_exact_line(text: str, lines: list[str]) -> None:
    with pytest.raises(TenantsError) as raised:
        parse_tenants(text, F)
    assert raised.value.lines == lines
    assert str(raised.value) == "\n".join(lines)
    assert SECRET not in str(raised.value)


VALID = """
[tenants.default]
greeting = "Hello."

[tenants.acme]
greeting = "  Welcome to Acme.  "
stt = "deepgram/nova-3"
llm = "openrtc/rules"
tts = "openrtc/tones"
max_sessions = 20
max_sessions_per_agent = 5
over_cap = "reject"

[tenants.acme.credentials]
OPENAI_API_KEY = "env:ACME_OPENAI_KEY"
DEEPGRAM_API_KEY = "file:/run/secrets/acme-deepgram"

[tenants.acme.breaker]
failure_ratio = 0.25
min_sessions = 10
window = 120
cooldown = 15

[tenants.quiet]
greeting = ""
"""


def test_a_valid_file_becomes_typed_entries_with_references_only() -> None:
    config = parse_tenants(VALID, F)
    acme = config.tenants["acme"]
    assert acme == TenantConfig(
        name="acme",
        stt="deepgram/nova-3",
        llm="openrtc/rules",
        tts="openrtc/tones",
        greeting="Welcome to Acme.",
        credentials={
            "OPENAI_API_KEY": Reference("env", "ACME_OPENAI_KEY"),
            "DEEPGRAM_API_KEY": Reference("file", "/run/secrets/acme-deepgram"),
        },
        max_sessions=20,
        max_sessions_per_agent=5,
        over_cap="reject",
        breaker=Breaker(failure_ratio=0.25, min_sessions=10, window=120.0, cooldown=15.0),
    )
    assert acme.describe()["credentials"] == {
        "OPENAI_API_KEY": "env:ACME_OPENAI_KEY",
        "DEEPGRAM_API_KEY": "file:/run/secrets/acme-deepgram",
    }
    # Defaults: no caps, wait, 0.20.1's breaker.
    default = config.tenants["default"]
    assert (default.max_sessions, default.over_cap, default.breaker) == (None, "wait", Breaker())
    assert config.env_names() == {"ACME_OPENAI_KEY"}


def test_a_tenant_the_file_does_not_list_gets_the_default_tenant_s_entry() -> None:
    config = parse_tenants(VALID, F)
    assert config.for_tenant("acme").greeting == "Welcome to Acme."
    unlisted = config.for_tenant("initech")
    assert (unlisted.name, unlisted.greeting) == ("initech", "Hello.")
    # No default entry: no overrides at all.
    bare = parse_tenants("[tenants.acme]\n", F).for_tenant("initech")
    assert bare == TenantConfig("initech")
    assert TenantsConfig().for_tenant("default") == TenantConfig("default")


class _Plain(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="plain")


def test_the_overrides_replace_the_agent_s_providers_and_greeting() -> None:
    tts = ToneTTS()
    agent = AgentConfig("a", _Plain, stt=None, llm=None, tts=tts, greeting="Agent hello.")
    config = parse_tenants(VALID, F)
    acme = with_tenant(agent, config.tenants["acme"])
    assert isinstance(acme.llm, OfflineLLM)  # "openrtc/rules": the offline LLM
    assert isinstance(acme.tts, ToneTTS)
    assert acme.tts is not tts
    assert acme.stt == "deepgram/nova-3"  # a LiveKit inference string, left to livekit-agents
    assert acme.greeting == "Welcome to Acme."
    # greeting = "" silences the agent's greeting; nothing else changes.
    quiet = with_tenant(agent, config.tenants["quiet"])
    assert (quiet.greeting, quiet.llm, quiet.tts) == (None, None, tts)
    # No entry: the agent's own configuration, unchanged.
    assert with_tenant(agent, TenantConfig("default")) is agent


def test_credentials_resolve_from_env_and_file_and_never_show(tmp_path: Path) -> None:
    key_file = tmp_path / "deepgram"
    key_file.write_text("dg-secret\n")
    text = VALID.replace("/run/secrets/acme-deepgram", str(key_file))
    acme = parse_tenants(text, F).tenants["acme"]
    settings = acme.resolve({"ACME_OPENAI_KEY": SECRET})
    assert settings.credential("OPENAI_API_KEY") == SECRET
    assert settings.credential("DEEPGRAM_API_KEY") == "dg-secret"
    assert settings.credential_names == ("OPENAI_API_KEY", "DEEPGRAM_API_KEY")
    assert SECRET not in repr(settings)
    assert "dg-secret" not in repr(settings)
    with pytest.raises(KeyError, match="tenant 'acme' has no credential 'OTHER'"):
        settings.credential("OTHER")
    # The session process's copy: the same settings.
    assert TenantSettings.from_wire(settings.to_wire()) == settings
    with pytest.raises(CredentialError) as unset:
        acme.resolve({})
    assert (
        str(unset.value)
        == "tenant 'acme': credentials.OPENAI_API_KEY: env:ACME_OPENAI_KEY is not set"
    )
    key_file.unlink()
    with pytest.raises(CredentialError) as gone:
        acme.resolve({"ACME_OPENAI_KEY": SECRET})
    assert str(gone.value) == (
        f"tenant 'acme': credentials.DEEPGRAM_API_KEY: file:{key_file} cannot be read: "
        "FileNotFoundError"
    )
    problems = reference_problems(parse_tenants(text, F), {})
    assert problems == [
        f"{A}: credentials.OPENAI_API_KEY: env:ACME_OPENAI_KEY is not set",
        f"{A}: credentials.DEEPGRAM_API_KEY: file:{key_file} is not a readable file",
    ]


def test_agent_code_reads_its_call_s_settings() -> None:
    # Outside a call: the current tenant's, no overrides, no credentials.
    assert openrtc.tenant_settings() == TenantSettings(TenantConfig("default"))
    settings = TenantConfig("acme", credentials={"K": Reference("env", "V")}).resolve({"V": "v"})
    with tenant_settings_scope(settings):
        assert openrtc.tenant_settings().credential("K") == "v"
    assert openrtc.tenant_settings().credential_names == ()


def test_the_file_is_found_like_the_agents(tmp_path: Path) -> None:
    assert find_tenants_file(None, tmp_path) is None
    (tmp_path / "tenants.toml").write_text("")
    assert find_tenants_file(None, tmp_path) == tmp_path / "tenants.toml"
    other = tmp_path / "elsewhere.toml"
    with pytest.raises(TenantsError) as missing:
        find_tenants_file(other, tmp_path)
    assert missing.value.lines == [
        f"{other}: the tenants file does not exist (--tenants, OPENRTC_TENANTS)"
    ]
    other.write_text("[tenants.acme]\n")
    assert find_tenants_file(other, tmp_path) == other
    assert list(load_tenants(other).tenants) == ["acme"]


# -- the worker's reload of the file (no servers: the watcher's apply) ----------


def test_the_watcher_applies_a_valid_change_and_keeps_the_last_good_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from openrtc.worker.tenants_watch import TenantsWatcher

    monkeypatch.setenv("ACME_KEY", SECRET)
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.acme]\ngreeting = "One."\n')
    ctx = SimpleNamespace(tenants=load_tenants(path))
    # Process isolation: its session processes started without ACME_KEY only.
    watcher = TenantsWatcher(
        ctx,  # type: ignore[arg-type]
        path,
        path.read_bytes(),
        hidden_env=frozenset({"ACME_KEY"}),
    )
    assert not watcher.apply()  # nothing changed

    path.write_text(
        '[tenants.acme]\ngreeting = "Two."\n[tenants.acme.credentials]\nK = "env:ACME_KEY"\n'
    )
    assert watcher.apply()
    assert ctx.tenants.tenants["acme"].greeting == "Two."

    def refused(text: str) -> list[str]:
        caplog.clear()
        path.write_text(text)
        assert not watcher.apply()
        assert ctx.tenants.tenants["acme"].greeting == "Two."  # the last good one
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    last_good = f"the last good tenants file stays in force ({path})"
    assert refused('[tenants.acme]\ngreeting = "Three."\nmax_sessions = 0\n') == [
        f"tenants file not reloaded: {path}: tenant 'acme': max_sessions: must be at least 1 "
        "and at most 1000000, not 0",
        last_good,
    ]
    assert refused('[tenants.acme.credentials]\nK = "env:UNSET_HERE"\n') == [
        f"tenants file not reloaded: {path}: tenant 'acme': credentials.K: env:UNSET_HERE "
        "is not set",
        f"tenants file not reloaded: {path}: env:UNSET_HERE: a credential variable the "
        "session processes were started with (they would all hold it); restart the worker "
        "to use it",
        last_good,
    ]
    monkeypatch.setenv("HOME_KEY", "x")
    assert refused('[tenants.acme.credentials]\nK = "env:HOME_KEY"\n')[0] == (
        f"tenants file not reloaded: {path}: env:HOME_KEY: a credential variable the "
        "session processes were started with (they would all hold it); restart the worker "
        "to use it"
    )
    caplog.clear()
    path.unlink()
    assert not watcher.apply()
    assert ctx.tenants.tenants["acme"].greeting == "Two."
    assert [r.getMessage() for r in caplog.records] == [
        f"tenants file {path} is gone; the last good one stays in force"
    ]
