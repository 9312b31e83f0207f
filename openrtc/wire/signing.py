"""Signed job entries, control entries and checkpoints: a key Redis never sees.

Without signing, anyone who can write to Redis can make an agent join any
existing room with metadata of their choosing (an ``XADD`` to a job stream),
end any call (a control entry), or inject history into a takeover (a
checkpoint). With a key (``OPENRTC_SIGNING_KEY`` or a key file), the
dispatcher signs what it writes, workers sign the checkpoints they save, and a
worker dead-letters an entry whose signature is missing or wrong
(``reason=forged``, its fields kept) and starts a takeover afresh rather than
load a forged checkpoint. Celery's ``auth`` serializer is the model: the
message carries a signature over its content and the id of the key that made
it; the reader verifies with its own copy of the key.

Here the MAC is HMAC-SHA256 over :func:`canonical` bytes: a domain tag, a
context (what kind of object, and for control entries and checkpoints whose
agent and job they belong to, so one cannot be replayed as another), and the
signed fields, sorted by name, every name and value length-prefixed, so no two
different field sets encode alike. Every field is signed except the
bookkeeping Redis scripts add after signing (:data:`UNSIGNED_JOB_FIELDS`): a
field added in a later version is signed without anyone remembering to.

Keys: one *current* key signs; an optional *previous* key only verifies, so a
key can be rotated without a flag day (deploy the new key as previous, then
swap, then drop the old). Each signature names its key by a short id derived
from the key itself, so verification tries one key, not all of them.

What signing does not give: freshness. A genuine entry copied back into a
stream still verifies (as a copy of a Celery message does); the job record's
de-duplication and the room check bound what that can do.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from openrtc.errors import ConfigError
from openrtc.wire.messages import (
    HANDOVER_FIELD,
    QUEUED_AT_FIELD,
    SIGNATURE_FIELD,
    ForgedEntry,
)

__all__ = [
    "KEY_ENV",
    "KEY_FILE_ENV",
    "MIN_KEY_BYTES",
    "PREVIOUS_KEY_ENV",
    "UNSIGNED_JOB_FIELDS",
    "UNSIGNED_WARNING",
    "SigningKeys",
    "canonical",
    "keys_from",
    "log_signing",
    "open_checkpoint",
    "seal_checkpoint",
    "sign_control",
    "sign_job",
    "sign_report",
    "verify_control",
    "verify_job",
    "verify_report",
]

#: The variable holding the current key (never a flag: flags show in ``ps``).
KEY_ENV: Final = "OPENRTC_SIGNING_KEY"
#: The variable holding the previous key, accepted but never used to sign.
PREVIOUS_KEY_ENV: Final = "OPENRTC_SIGNING_KEY_PREVIOUS"
#: The variable naming a key file (``--signing-key-file``): the current key on
#: its first line, the previous one on an optional second line.
KEY_FILE_ENV: Final = "OPENRTC_SIGNING_KEY_FILE"
#: What a dispatcher or worker without a key logs once at start-up.
UNSIGNED_WARNING: Final = (
    "entries and checkpoints are not signed: anyone who can write to this Redis can "
    f"make an agent join a room, end a call or feed a takeover; set {KEY_ENV} "
    "(README, Signing), and --require-signing where Redis is shared"
)


def log_signing(logger: logging.Logger, keys: SigningKeys | None) -> None:
    """The start-up line about signing: the key id in use, or the warning."""
    if keys is None:
        logger.warning(UNSIGNED_WARNING)
    else:
        logger.info(
            "signing with key %s%s",
            keys.key_id,
            " (a previous key is accepted too)" if keys.previous is not None else "",
        )


#: Shortest key accepted: 32 bytes, as ``openssl rand -hex 32`` gives twice over.
MIN_KEY_BYTES: Final = 32

#: Job entry fields a signature does not cover: its own field, and what Redis
#: scripts add to a signed entry (the enqueue and replay scripts' Redis-clock
#: stamp, ``RELEASE``'s handover mark). Each only advises; none chooses a room,
#: an identity or what the agent is told.
UNSIGNED_JOB_FIELDS: Final = frozenset(
    {SIGNATURE_FIELD, QUEUED_AT_FIELD.encode(), HANDOVER_FIELD.encode()}
)
#: Control entry fields a signature does not cover.
_UNSIGNED_CONTROL_FIELDS: Final = frozenset({SIGNATURE_FIELD})

#: Separates this MAC's input from any other use of the same key.
_DOMAIN: Final = b"openrtc-signature-v1\x00"
#: The signature format's tag, first in every signature value.
_SCHEME: Final = b"v1"
_JOB: Final = b"job"
_CONTROL: Final = b"control"
_CHECKPOINT: Final = b"checkpoint"
_REPORT: Final = b"report"
#: How a signed checkpoint starts (a plain one is JSON, so starts with ``{``).
_CHECKPOINT_PREFIX: Final = b"openrtc-signed:"


def canonical(
    context: bytes, fields: Mapping[bytes, bytes], unsigned: frozenset[bytes] = frozenset()
) -> bytes:
    """The bytes a MAC covers: the context, then the fields not in ``unsigned``.

    Names sorted, so the order the fields arrive in does not matter (Redis
    scripts copy entries field by field). Unambiguous: after the domain tag come
    the context's length, the number of fields and every name's and value's
    length (4 bytes each, big-endian), then the context and the names and values
    themselves, so no value can pass for a name or a boundary. (All lengths in
    one ``struct.pack``: this runs for every job a dispatcher enqueues.)
    """
    names = sorted(name for name in fields if name not in unsigned)
    lengths: list[int] = []
    parts: list[bytes] = [_DOMAIN, b"", context]
    for name in names:
        value = fields[name]
        lengths += (len(name), len(value))
        parts += (name, value)
    parts[1] = struct.pack(f">{2 + len(lengths)}I", len(context), len(names), *lengths)
    return b"".join(parts)


def key_id(key: bytes) -> bytes:
    """A short public name for ``key`` (8 hex digits), derived from it one way."""
    return hmac.new(key, b"openrtc-signing-key-id", hashlib.sha256).hexdigest()[:8].encode()


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The current key (signs and verifies) and an optional previous one (verifies only).

    The keys are kept out of ``repr``: a settings object that holds this can be logged.
    """

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)
    #: Key id -> key, for verification.
    _by_id: dict[bytes, bytes] = field(init=False, repr=False, compare=False)
    #: The current key's id, computed once (it prefixes every signature).
    _current_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, key in (("current", self.current), ("previous", self.previous)):
            if key is not None and len(key) < MIN_KEY_BYTES:
                raise ConfigError(
                    f"signing key ({name}) is {len(key)} bytes; at least {MIN_KEY_BYTES} "
                    "are needed (openssl rand -hex 32)"
                )
        current_id = key_id(self.current)
        by_id = {current_id: self.current}
        if self.previous is not None:
            by_id.setdefault(key_id(self.previous), self.previous)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_current_id", current_id)

    @property
    def key_id(self) -> str:
        """The id of the key that signs (safe to log)."""
        return self._current_id.decode()

    def sign(
        self, context: bytes, fields: Mapping[bytes, bytes], unsigned: frozenset[bytes]
    ) -> bytes:
        """The signature value of ``fields`` under ``context``: ``v1:<key id>:<hex MAC>``."""
        mac = hmac.digest(self.current, canonical(context, fields, unsigned), "sha256")
        return b":".join((_SCHEME, self._current_id, mac.hex().encode()))

    def verify(
        self,
        context: bytes,
        fields: Mapping[bytes, bytes],
        unsigned: frozenset[bytes],
        signature: bytes | None,
    ) -> None:
        """Raise :class:`ForgedEntry` unless ``signature`` signs ``fields``."""
        if not signature:
            raise ForgedEntry("not signed")
        scheme, _, rest = signature.partition(b":")
        kid, _, mac = rest.partition(b":")
        if scheme != _SCHEME:
            raise ForgedEntry("unknown signature scheme")
        key = self._by_id.get(kid)
        if key is None:
            # The id is shown: it names no key here, so it says which one to look for.
            raise ForgedEntry(f"signed with an unknown key ({kid[:16].decode(errors='replace')!r})")
        expected = hmac.digest(key, canonical(context, fields, unsigned), "sha256")
        if not hmac.compare_digest(expected.hex().encode(), mac):
            raise ForgedEntry("signature does not match")


def sign_job(keys: SigningKeys, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """A job entry's fields with its signature (``fields`` as ``JobMessage.encode`` gives)."""
    signed = dict(fields)
    signed[SIGNATURE_FIELD] = keys.sign(_JOB, signed, UNSIGNED_JOB_FIELDS)
    return signed


def verify_job(keys: SigningKeys, fields: Mapping[bytes, bytes]) -> None:
    """Raise :class:`~openrtc.wire.messages.ForgedEntry` unless the job entry is signed by us."""
    keys.verify(_JOB, fields, UNSIGNED_JOB_FIELDS, fields.get(SIGNATURE_FIELD))


def _control_context(agent: str) -> bytes:
    # The agent: a termination for one agent's job is no termination for another's.
    return _CONTROL + b"\x00" + agent.encode()


def sign_control(
    keys: SigningKeys, agent: str, fields: Mapping[bytes, bytes]
) -> dict[bytes, bytes]:
    """A control entry for ``agent``'s stream, signed."""
    signed = dict(fields)
    signed[SIGNATURE_FIELD] = keys.sign(_control_context(agent), signed, _UNSIGNED_CONTROL_FIELDS)
    return signed


def verify_control(keys: SigningKeys, agent: str, fields: Mapping[bytes, bytes]) -> None:
    """Raise :class:`ForgedEntry` unless ``agent``'s control entry is ours."""
    keys.verify(
        _control_context(agent), fields, _UNSIGNED_CONTROL_FIELDS, fields.get(SIGNATURE_FIELD)
    )


def _checkpoint_fields(agent: str, job_id: str, data: bytes) -> dict[bytes, bytes]:
    # Bound to its job: one call's checkpoint cannot be copied into another's.
    return {b"agent": agent.encode(), b"job_id": job_id.encode(), b"data": data}


def seal_checkpoint(keys: SigningKeys, agent: str, job_id: str, data: bytes) -> bytes:
    """``data`` (an encoded checkpoint) as stored: the signature line, then the data."""
    signature = keys.sign(_CHECKPOINT, _checkpoint_fields(agent, job_id, data), frozenset())
    return _CHECKPOINT_PREFIX + signature + b"\n" + data


def open_checkpoint(keys: SigningKeys | None, agent: str, job_id: str, stored: bytes) -> bytes:
    """The checkpoint data in ``stored``; raises :class:`~openrtc.wire.messages.ForgedEntry`.

    Without keys nothing is verified (as without signing at all): a signed
    checkpoint's data is returned as is.
    """
    signature: bytes | None = None
    data = stored
    if stored.startswith(_CHECKPOINT_PREFIX):
        signature, _, data = stored[len(_CHECKPOINT_PREFIX) :].partition(b"\n")
    if keys is not None:
        keys.verify(_CHECKPOINT, _checkpoint_fields(agent, job_id, data), frozenset(), signature)
    return data


def sign_report(keys: SigningKeys, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """A call report entry's fields, signed like job entries (its own context)."""
    signed = dict(fields)
    signed[SIGNATURE_FIELD] = keys.sign(_REPORT, signed, _UNSIGNED_CONTROL_FIELDS)
    return signed


def verify_report(keys: SigningKeys, fields: Mapping[bytes, bytes]) -> None:
    """Raise :class:`ForgedEntry` unless the report entry is signed by us."""
    keys.verify(_REPORT, fields, _UNSIGNED_CONTROL_FIELDS, fields.get(SIGNATURE_FIELD))


def _key_text(raw: str, source: str) -> bytes:
    key = raw.strip()
    if not key:
        raise ConfigError(f"{source} is empty")
    return key.encode()


def keys_from(env: Mapping[str, str], key_file: str | Path | None = None) -> SigningKeys | None:
    """The signing keys configured in ``env`` or ``key_file``; ``None`` when there are none.

    ``key_file`` (``--signing-key-file``, else ``OPENRTC_SIGNING_KEY_FILE``):
    the current key on the first line, an optional previous key on the second.
    Else ``OPENRTC_SIGNING_KEY`` and ``OPENRTC_SIGNING_KEY_PREVIOUS``. Both a
    file and a key variable, an unreadable file or a short key: a
    :class:`~openrtc.errors.ConfigError` that never quotes a key.
    """
    path = key_file or env.get(KEY_FILE_ENV) or None
    if path is not None:
        if env.get(KEY_ENV) or env.get(PREVIOUS_KEY_ENV):
            raise ConfigError(f"a signing key file and {KEY_ENV}: set one of them, not both")
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"signing key file {path}: {type(exc).__name__}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not 1 <= len(lines) <= 2:
            raise ConfigError(
                f"signing key file {path}: one key per line, the current one first "
                f"and at most one previous ({len(lines)} lines)"
            )
        previous = lines[1].encode() if len(lines) == 2 else None
        return SigningKeys(lines[0].encode(), previous)
    current = env.get(KEY_ENV)
    previous_text = env.get(PREVIOUS_KEY_ENV)
    if not current:
        if previous_text:
            raise ConfigError(f"{PREVIOUS_KEY_ENV} is set without {KEY_ENV}")
        return None
    previous = _key_text(previous_text, PREVIOUS_KEY_ENV) if previous_text else None
    return SigningKeys(_key_text(current, KEY_ENV), previous)
