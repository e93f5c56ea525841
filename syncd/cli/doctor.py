"""`syncd doctor`: the checklist to run before trusting an installation.

Each check ends in a line `ok`, `warn` (works, but know this) or `fail` (fix it first), with what
to do. The verdicts (`judge_*`) are pure functions of facts and tested by tables; the facts are
gathered by `doctor_facts`: the configuration file, the secret files, Redis, and per tenant
one token grant and one small export request.

Exit status: 0 when nothing fails (warnings allowed), 1 when a check fails, 2 when the
configuration cannot be read or is invalid as `check-config` says. Then nothing else can be
checked, unless only secret files' owner or mode make it invalid: those are read anyway so that
every other check runs.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

import msgspec

from syncd.cli import doctor_facts as facts
from syncd.cli.doctor_facts import (
    AclFacts,
    ClockSample,
    OutcomeKind,
    RedisFacts,
    SecretFile,
    TenantFacts,
)
from syncd.config import CREDENTIALS_VARIABLE, ConfigError, load, resolve
from syncd.redis import checks as redischeck
from syncd.redis.checks import NodeSettings

if TYPE_CHECKING:  # imported when used: psycopg comes with the postgres extra only
    from syncd.mirror.check import PostgresFacts

Status = Literal["ok", "warn", "fail"]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
MIN_REDIS = (7, 0)
# The API's clock against this host's: past these offsets (after allowing for the Date header's
# one-second resolution and the request's round trip) a warning, then a failure.
CLOCK_WARN_S = 5.0
CLOCK_FAIL_S = 60.0
CLOCK_WHY = (
    "a Retry-After given as an HTTP date is turned into a wait against this clock (too long a "
    "wait, or retries into more 429s), and TLS certificate validity is judged by it"
)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the checklist."""

    check: str
    status: Status
    detail: str
    action: str = ""  # what to do; empty when nothing is to be done
    tenant: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.check, "status": self.status, "detail": self.detail}
        if self.action:
            out["action"] = self.action
        if self.tenant is not None:
            out["tenant"] = self.tenant
        return out


# -- verdicts ---------------------------------------------------------------------------------


def judge_config(path: str, error: str | None, tenants: int = 0, feeds: int = 0) -> Line:
    """The configuration as `syncd check-config` judges it, with the same error text."""
    if error is not None:
        return Line(
            "configuration", "fail", error, "fix it (`syncd check-config FILE` says the same)"
        )
    return Line("configuration", "ok", f"{path}: {tenants} tenants, {feeds} feeds")


def judge_secret_file(f: SecretFile) -> Line:
    if f.problem is None:
        return Line("secret file", "ok", f"{f.key} {f.path}: only its owner can read it")
    if f.unset:
        return Line("secret file", "fail", f"{f.key}: {f.problem}", _unset_action(f.unset))
    return Line(
        "secret file",
        "fail",
        f"{f.key}: {f.problem}",
        f"chmod 0600 {f.path}, owned by the user syncd runs as (or root); a symlink may point "
        "only within its own directory",
    )


def _unset_action(names: Sequence[str]) -> str:
    if CREDENTIALS_VARIABLE not in names:
        return f"set {', '.join(names)} in doctor's environment as in the service's"
    return (
        f"run doctor the way systemd runs syncd: systemd sets {CREDENTIALS_VARIABLE}, to a "
        "private copy of the files the unit's LoadCredential= lines name, only inside that "
        "service. E.g. sudo systemd-run --pipe --wait --collect -p DynamicUser=yes -p User=syncd "
        "-p LoadCredential=... (each of the unit's) syncd doctor --config FILE (the README's "
        "production quick start)"
    )


def judge_inline_secrets(path: str, keys: Sequence[str], problem: str | None) -> Line | None:
    """Secrets written into the configuration file make that file a secret file too."""
    if not keys:
        return None
    where = f"{path} holds {', '.join(keys)} inline"
    if problem is None:
        return Line("secret file", "ok", f"{where}; only its owner can read it")
    return Line(
        "secret file",
        "warn",
        f"{where} and {problem.split('; ')[0]}",
        f"chmod 0600 {path}, or move the secrets to *_file or *_env settings",
    )


def judge_redis(facts: RedisFacts, *, allow_eviction: bool, prefix: str) -> list[Line]:
    """Reachable and new enough, eviction policy, persistence, the user's permissions."""
    if facts.error is not None:
        return [
            Line(
                "redis",
                "fail",
                f"cannot use Redis at {facts.where}: {facts.error}",
                "start Redis, or fix [redis] url (host, port, user, password, TLS)",
            )
        ]
    lines = [_judge_version(facts)]
    found = redischeck.assess(list(facts.nodes), allow_eviction=allow_eviction)
    if found.unreadable:
        errors = "; ".join(f"{n}: {e}" for n, e in found.unreadable.items())
        unread = f"CONFIG GET refused ({errors})"
        ask = "check it on the server (CONFIG GET maxmemory-policy, appendonly, save)"
        lines.append(Line("redis eviction", "warn", f"maxmemory-policy not checked: {unread}", ask))
        lines.append(Line("redis persistence", "warn", f"not checked: {unread}", ask))
    else:
        lines.append(_judge_eviction(facts.nodes, found))
        lines.append(_judge_persistence(found))
    if facts.acl is not None:
        lines.append(judge_acl(facts.acl, prefix))
    return lines


def _judge_version(facts: RedisFacts) -> Line:
    if facts.version is None:
        return Line(
            "redis",
            "warn",
            f"reachable at {facts.where}, version unknown: {facts.version_error}",
            f"check that it runs Redis {'.'.join(map(str, MIN_REDIS))} or later",
        )
    if redischeck.version_tuple(facts.version) < MIN_REDIS:
        return Line(
            "redis",
            "fail",
            f"Redis {facts.version} at {facts.where}; syncd needs 7.0 or later",
            "upgrade Redis (or use Valkey); syncd refuses to start on an older one",
        )
    return Line("redis", "ok", f"Redis {facts.version} at {facts.where}")


def _judge_eviction(nodes: Sequence[NodeSettings], found: redischeck.Assessment) -> Line:
    policies = ", ".join(sorted({n.policy or "unknown" for n in nodes}))
    if found.refusals:
        return Line(
            "redis eviction",
            "fail",
            f"maxmemory-policy {policies}: Redis may evict cursors, fingerprints or whole "
            "streams (events repeated or lost); syncd refuses to start",
            "set maxmemory-policy noeviction (or a volatile-* policy), or accept the risk with "
            "[redis] allow_eviction = true",
        )
    if found.evicting:
        return Line(
            "redis eviction",
            "warn",
            f"maxmemory-policy {policies}, accepted by [redis] allow_eviction: events may be "
            "repeated or lost under memory pressure",
            "set maxmemory-policy noeviction unless losing events is acceptable",
        )
    return Line("redis eviction", "ok", f"maxmemory-policy {policies}")


def _judge_persistence(found: redischeck.Assessment) -> Line:
    if found.persistence is not None:
        return Line(
            "redis persistence",
            "warn",
            found.persistence,
            "CONFIG SET appendonly yes (and in redis.conf), unless starting over is acceptable",
        )
    return Line("redis persistence", "ok", "AOF or RDB save points configured")


def judge_acl(acl: AclFacts, prefix: str) -> Line:
    how = "asked with ACL DRYRUN" if acl.method == "ACL DRYRUN" else "each run in a harmless form"
    where = f"on keys under {prefix}:*"
    if not acl.denied:
        return Line(
            "redis permissions",
            "ok",
            f"the user may run the {acl.checked} commands syncd needs {where} ({how})",
        )
    names = ", ".join(name for name, _ in acl.denied)
    return Line(
        "redis permissions",
        "fail",
        f"the user may not run {names} {where} ({how}; Redis said: {acl.denied[0][1]})",
        "grant them to syncd's Redis user (the README's ACL SETUSER line)",
    )


def judge_tenant(t: TenantFacts) -> list[Line]:
    """The token grant and the export request of one tenant."""
    tok = t.token
    if tok.kind != "ok":
        return [_judge_token_failure(t)]
    lines = [Line("token", "ok", "granted", tenant=t.tenant)]
    ex = t.export
    assert ex is not None
    if ex.kind == "ok":
        lines.append(
            Line("export", "ok", f"{t.feed}: answered ({t.records} records)", tenant=t.tenant)
        )
        return lines
    status: Status = "warn" if ex.kind == "rate_limited" else "fail"
    actions: dict[OutcomeKind, str] = {
        "refused": "check servicetitan.app_key and the tenant's app connection",
        "rate_limited": "run doctor again later; something else spends this tenant's rate limit",
        "unavailable": f"give the app access to {t.feed} for this tenant, or leave the feed out "
        f"of {t.key}.feeds",
        "bad_request": "report it: the API refused the request syncd sends",
        "transient": "check servicetitan.api_url and the network path to it, then retry",
    }
    lines.append(
        Line(
            "export",
            status,
            f"{t.feed}: {ex.text}",
            actions.get(ex.kind, ""),
            tenant=t.tenant,
        )
    )
    return lines


def _judge_token_failure(t: TenantFacts) -> Line:
    tok = t.token
    if tok.kind == "rate_limited":
        return Line(
            "token",
            "warn",
            f"the token endpoint is rate limiting this client: {tok.text}; export not tried",
            "run doctor again in a minute",
            tenant=t.tenant,
        )
    if tok.kind == "refused":
        return Line(
            "token",
            "fail",
            f"credentials refused: {tok.text}; export not tried",
            f"check {t.key}.client_id and its client secret (the app's credentials for this "
            "tenant)",
            tenant=t.tenant,
        )
    return Line(
        "token",
        "fail",
        f"no token: {tok.text}; export not tried",
        "check servicetitan.auth_url and the network path to it, then retry",
        tenant=t.tenant,
    )


def clock_offset(s: ClockSample) -> tuple[float, float]:
    """(offset, uncertainty) in seconds: the Date header truncates to whole seconds, and the
    server stamped it at some point between sending and receiving."""
    offset = s.server + 0.5 - (s.sent + s.received) / 2
    return offset, 0.5 + (s.received - s.sent) / 2


def judge_clock(samples: Sequence[ClockSample]) -> Line:
    if not samples:
        return Line(
            "clock",
            "warn",
            "not measured: no answer from the API carried a Date header",
            f"compare this host's clock with a time server; {CLOCK_WHY}",
        )
    worst = max(samples, key=lambda s: abs(clock_offset(s)[0]))
    offset, margin = clock_offset(worst)
    beyond = abs(offset) - margin  # the least the clocks can differ by
    where = "ahead of" if offset > 0 else "behind"
    detail = f"the API's clock is {abs(offset):.1f} s (±{margin:.1f}) {where} this host's"
    if beyond > CLOCK_FAIL_S:
        status: Status = "fail"
    elif beyond > CLOCK_WARN_S:
        status = "warn"
    else:
        return Line("clock", "ok", detail)
    return Line("clock", status, f"{detail}; {CLOCK_WHY}", "synchronise this host's clock (NTP)")


def judge_postgres(f: PostgresFacts | str) -> Line:
    """The mirror's PostgreSQL (`[mirror] url`); a str: why it could not be looked at."""
    if isinstance(f, str):
        return Line("mirror postgres", "fail", f, "pip install 'syncd[postgres]'")
    if f.error is not None:
        return Line(
            "mirror postgres",
            "fail",
            f"{f.where}: {f.error}",
            "check [mirror] url and its password (password_file, password_env), and that the"
            " server takes connections from this host (pg_hba.conf)",
        )
    major = f"PostgreSQL {f.server_version // 10000}"
    if f.server_version < f.min_version:
        return Line(
            "mirror postgres",
            "fail",
            f"{f.where}: {major}",
            "the mirror needs PostgreSQL 15 or newer",
        )
    if f.read_only:
        return Line(
            "mirror postgres",
            "fail",
            f"{f.where}: {major} takes no writes (a standby, or read-only by default)",
            "point [mirror] url at the primary",
        )
    if f.newest_table_version > f.code_version:
        return Line(
            "mirror postgres",
            "fail",
            f"{f.where}: tables at version {f.newest_table_version}, this syncd knows"
            f" {f.code_version}",
            "run the newer syncd's mirror, or a schema of its own ([mirror] schema)",
        )
    if not f.can_create and (not f.schema_exists or f.newest_table_version < f.code_version):
        return Line(
            "mirror postgres",
            "fail",
            f"{f.where}: the user may not create the mirror's schema or tables",
            "GRANT CREATE ON DATABASE (or ON SCHEMA) to the mirror's user",
        )
    state = f"tables at version {f.newest_table_version}" if f.schema_exists else "no schema yet"
    return Line("mirror postgres", "ok", f"{f.where}: {major}, writable, {state}")


def exit_code(lines: Sequence[Line], *, config_usable: bool = True) -> int:
    if not config_usable:
        return EXIT_CONFIG
    return EXIT_FAILED if any(ln.status == "fail" for ln in lines) else EXIT_OK


# -- output -----------------------------------------------------------------------------------


def render_table(lines: Sequence[Line], code: int) -> str:
    """The human checklist. Per-tenant lines that are ok are folded into one per check."""
    out: list[str] = []
    folded: dict[str, list[int]] = {}
    for ln in lines:
        if ln.tenant is not None and ln.status == "ok":
            folded.setdefault(ln.check, []).append(ln.tenant)
    shown: set[str] = set()
    for ln in lines:
        if ln.tenant is not None and ln.status == "ok":
            if ln.check in shown:
                continue
            shown.add(ln.check)
            tenants = folded[ln.check]
            named = ", ".join(map(str, tenants[:8])) + (", ..." if len(tenants) > 8 else "")
            what = "granted" if ln.check == "token" else "answered"
            many = f"{len(tenants)} tenant{'s' if len(tenants) > 1 else ''}"
            out.append(_row("ok", ln.check, f"{what} for {many} ({named})"))
            continue
        label = ln.check if ln.tenant is None else f"{ln.check} {ln.tenant}"
        out.append(_row(ln.status, label, ln.detail))
        if ln.action:
            out.append(f"{'':6}{'':20}-> {ln.action}")
    counts = {s: sum(ln.status == s for ln in lines) for s in ("ok", "warn", "fail")}
    warnings = f"{counts['warn']} warning{'' if counts['warn'] == 1 else 's'}"
    out.append(f"{counts['fail']} failed, {warnings}, {counts['ok']} ok: exit {code}")
    return "\n".join(out) + "\n"


def _row(status: str, label: str, detail: str) -> str:
    return f"{status:<6}{label:<20}{detail}"


def render_json(lines: Sequence[Line], code: int) -> str:
    counts = {s: sum(ln.status == s for ln in lines) for s in ("ok", "warn", "fail")}
    body = {"exit": code, "summary": counts, "checks": [ln.to_json() for ln in lines]}
    return json.dumps(body, indent=2) + "\n"


# -- the run ----------------------------------------------------------------------------------


async def diagnose(path: str, environ: Mapping[str, str] | None = None) -> tuple[list[Line], int]:
    """Every check's line, and the exit status."""
    env = os.environ if environ is None else environ
    try:
        cfg = load(path)
    except ConfigError as exc:
        return [judge_config(path, str(exc))], EXIT_CONFIG
    files = [judge_secret_file(f) for f in facts.secret_files(cfg, env)]
    inline = facts.inline_secrets(cfg)
    mode = facts.file_mode_problem(path) if inline else None
    inline_line = judge_inline_secrets(path, inline, mode)
    files += [inline_line] if inline_line is not None else []
    refused: str | None = None
    try:
        settings = resolve(cfg, env)
    except ConfigError as exc:
        refused = str(exc)
        try:
            # Where only secret files' owner or mode stand in the way, read them anyway so that
            # every other check still runs; the configuration stays refused (exit 2).
            lenient = msgspec.structs.replace(cfg, allow_insecure_secret_files=True)
            settings = resolve(lenient, env)
        except ConfigError:
            return [judge_config(path, refused), *files], EXIT_CONFIG
    feeds = sum(len(t.feeds) for t in settings.tenants)
    lines = [judge_config(path, refused, len(settings.tenants), feeds), *files]
    rc = settings.config.redis  # TLS file paths expanded
    redis_facts, (tenants, samples) = await asyncio.gather(
        facts.gather_redis(
            rc,
            fleet=settings.config.fleet.enabled,
            sentinel_password=(
                settings.sentinel_password.reveal() if settings.sentinel_password else None
            ),
        ),
        facts.gather_api(settings),
    )
    lines += judge_redis(redis_facts, allow_eviction=rc.allow_eviction, prefix=rc.key_prefix)
    if settings.config.mirror is not None:
        lines.append(judge_postgres(await _postgres(settings)))
    for t in tenants:
        lines += judge_tenant(t)
    lines.append(judge_clock(samples))
    return lines, exit_code(lines, config_usable=refused is None)


async def _postgres(settings: Any) -> PostgresFacts | str:
    try:
        from syncd.mirror.check import gather_postgres
    except ImportError:  # psycopg: the postgres extra
        return "[mirror] is configured, but psycopg is not installed"
    return await gather_postgres(settings)


def run(path: str, *, as_json: bool, out: TextIO, environ: Mapping[str, str] | None = None) -> int:
    """`syncd doctor`: print the checklist; the exit status."""
    lines, code = asyncio.run(diagnose(path, environ))
    out.write(render_json(lines, code) if as_json else render_table(lines, code))
    return code
