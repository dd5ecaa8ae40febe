"""The `storage` section: fsspec options per protocol, secrets named by environment variable, applied to every process
that opens files, and kept out of everything clipline writes or logs.

`storage.s3.endpoint_url=http://127.0.0.1:9000 storage.s3.secret=${ENV:MY_SECRET}` holds, per protocol, keyword
arguments of that protocol's fsspec filesystem. The Config keeps `${ENV:NAME}` as written; the value is read from the
environment only by `applied()`, in the process that runs the command, and goes to fsspec's global config
(`fsspec.config.conf`, which fsspec merges into the arguments of every filesystem it makes, whoever asks: clipline,
img2dataset, webdataset readers, autofaiss, embedding-reader) and to fsspec's own environment variables
(`FSSPEC_<PROTOCOL>`, read by fsspec when a process imports it), which every child process inherits: the local pool's
workers and img2dataset's spawned workers and logger. Spark executors get the same variables through
`SparkContext.environment` (`spark_environment()`), which PySpark hands to the Python workers of every task defined
while it is set, never through Spark conf (shown by Spark's UI and event logs).

What is written or logged: `redact()` replaces literal values of secret-looking keys in a config dict by "***"
(`${ENV:NAME}` references stay: a name is not a secret); `mask()` replaces every secret value this process knows of
(resolved from a reference, or a literal under a secret-looking key) by "***" in text, and `MaskSecrets` does it to
every log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any, Iterator, Mapping

from pipeline.core.errors import ConfigError

ENV_REF = re.compile(r"\$\{ENV:([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Option names whose literal values are secrets. Spark's own spark.redaction.regex, plus the credential options of
# s3fs (key, secret, token, session_token), gcsfs (token, credentials) and adlfs (account_key, sas_token,
# connection_string, client_secret).
SECRET_KEY = re.compile(
    r"(?i)(^key$|secret|password|passwd|token|access[._]?key|account_key|credential|connection_string|signature|"
    r"private|auth)"
)
REDACTED = "***"
MIN_MASKED = 4  # shorter values are not masked in text: "abc" would blank every word that holds it
_SECRETS: set[str] = set()


def check(section: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate a storage section (protocol -> options) without resolving anything: protocols fsspec knows, options
    as mappings of JSON values, well-formed references."""
    import fsspec

    known = set(fsspec.available_protocols())
    out: dict[str, dict[str, Any]] = {}
    for protocol, options in section.items():
        if protocol not in known:
            raise ValueError(f"{protocol!r} is not an fsspec protocol (for example s3, gcs, abfs, http)")
        if not isinstance(options, Mapping):
            raise ValueError(f"storage.{protocol} must be a mapping of options")
        try:
            json.dumps(dict(options))
        except (TypeError, ValueError) as e:
            raise ValueError(f"storage.{protocol}: options must be plain values, lists and mappings ({e})") from None
        for path, value in _leaves(options, f"storage.{protocol}"):
            for name in ENV_REF.findall(value) if isinstance(value, str) else ():
                if not _ENV_NAME.fullmatch(name):
                    raise ValueError(f"{path}: ${{ENV:{name}}} does not name an environment variable")
        out[protocol] = dict(options)
    return out


def _leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}.{i}")
    else:
        yield path, node


def _resolve_value(value: Any, path: str, key: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _resolve_value(v, f"{path}.{k}", str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_value(v, f"{path}.{i}", key, env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if SECRET_KEY.search(key) and not ENV_REF.search(value):
        _remember(value)

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            raise ConfigError(f"{path}: environment variable {name} is not set (referenced as ${{ENV:{name}}})")
        _remember(env[name])
        return env[name]

    return ENV_REF.sub(substitute, value)


def resolve(section: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The section with every `${ENV:NAME}` replaced by the variable's value (ConfigError naming the key when one is
    not set); the secrets met on the way are remembered for `mask()`. For fsspec, never for anything written."""
    env = os.environ if env is None else env
    return {p: _resolve_value(o, f"storage.{p}", p, env) for p, o in section.items()}


def _remember(value: str) -> None:
    if len(value) >= MIN_MASKED:
        _SECRETS.add(value)


def remember(section: Mapping[str, Any]) -> None:
    """Learn the secrets of a section whose values this process's environment holds (a local pool worker: it
    inherited the command's environment), so its log lines are masked too; unset variables are skipped."""
    env = os.environ
    for _, value in _leaves(section, "storage"):
        for name in ENV_REF.findall(value) if isinstance(value, str) else ():
            if name in env:
                _remember(env[name])
    for path, value in _leaves(section, "storage"):
        if isinstance(value, str) and SECRET_KEY.search(path.rsplit(".", 1)[-1]) and not ENV_REF.search(value):
            _remember(value)
    for protocol, options in section.items():  # a Spark executor: the values came as FSSPEC_<PROTOCOL>
        given = dict(_leaves(_env_options(protocol), f"storage.{protocol}"))
        for path, value in _leaves(options, f"storage.{protocol}"):
            secret = SECRET_KEY.search(path.rsplit(".", 1)[-1]) or (isinstance(value, str) and ENV_REF.search(value))
            if secret and isinstance(given.get(path), str):
                _remember(given[path])


def _env_options(protocol: str) -> dict[str, Any]:
    raw = os.environ.get(env_name(protocol))
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def mask(text: str) -> str:
    """`text` with every secret this process knows of replaced by "***" (also in its JSON-escaped form)."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
        escaped = json.dumps(secret)[1:-1]
        if escaped != secret and escaped in text:
            text = text.replace(escaped, REDACTED)
    return text


def mask_data(data: Any) -> Any:
    """A JSON-able value with mask() applied to every string in it (keys included)."""
    if not _SECRETS:
        return data
    return json.loads(mask(json.dumps(data, default=str)))


def _redact_node(node: Any, key: str) -> Any:
    if isinstance(node, Mapping):
        return {k: _redact_node(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact_node(v, key) for v in node]
    if isinstance(node, str) and SECRET_KEY.search(key) and not ENV_REF.fullmatch(node):
        return REDACTED
    return node


def _holds_options(path: str) -> bool:
    """Whether a dotted config path lies where `redact()` looks for secret-looking keys (storage, spark.conf)."""
    return path.split(".", 1)[0] == "storage" or path.startswith("spark.conf")


def redact_value(value: Any, path: str) -> Any:
    """One value given at dotted `path` as it may be shown (in an error message): redacted as `redact()` would."""
    if _holds_options(path):
        return mask_data(_redact_node(value, path.rsplit(".", 1)[-1] if "." in path else "storage"))
    return mask_data(value)


def redact_arg(arg: str) -> str:
    """A command-line argument as it may be written: `storage.s3.secret=VALUE` (or a spark.conf one) redacted as
    `redact()` would, every known secret masked."""
    key, eq, value = arg.partition("=")
    path = key.strip().lstrip("+")
    if eq and _holds_options(path) and _redact_node(value, path.rsplit(".", 1)[-1]) == REDACTED:
        return f"{key}={REDACTED}"
    return mask(arg)


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict as clipline writes or logs it: in `storage` and `spark.conf`, literal values of secret-looking
    keys become "***" (references `${ENV:NAME}` are kept); then every known secret masked wherever it appears."""
    out = dict(config)
    if isinstance(out.get("storage"), Mapping):
        out["storage"] = _redact_node(out["storage"], "storage")
    spark = out.get("spark")
    if isinstance(spark, Mapping) and isinstance(spark.get("conf"), Mapping):
        out["spark"] = {**spark, "conf": _redact_node(spark["conf"], "conf")}
    return mask_data(out)  # type: ignore[no-any-return]


def env_name(protocol: str) -> str:
    """fsspec's environment variable for one protocol's options (fsspec.config.set_conf_env)."""
    return f"FSSPEC_{protocol.upper()}"


@contextlib.contextmanager
def applied(section: Mapping[str, Any]) -> Iterator[dict[str, dict[str, Any]]]:
    """For the length of a block: the section resolved, merged over fsspec's global config (so every filesystem this
    process makes gets its options) and exported as FSSPEC_<PROTOCOL> (so every process started meanwhile does);
    both restored afterwards. Yields the resolved options."""
    import fsspec.config

    resolved = resolve(section)
    saved_conf = {p: fsspec.config.conf.get(p) for p in resolved}
    saved_env = {k: os.environ.get(k) for k in map(env_name, resolved)}
    try:
        for protocol, options in resolved.items():
            fsspec.config.conf[protocol] = {**(fsspec.config.conf.get(protocol) or {}), **options}
            variables_value = {**_env_options(protocol), **options}
            if variables_value:
                os.environ[env_name(protocol)] = json.dumps(variables_value)
        yield resolved
    finally:
        for protocol, before in saved_conf.items():
            if before is None:
                fsspec.config.conf.pop(protocol, None)
            else:
                fsspec.config.conf[protocol] = before
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def spark_environment(sc: Any, section: Mapping[str, Any]) -> Iterator[None]:
    """For the length of a block: the FSSPEC_<PROTOCOL> variables of this process (set by `applied()`) for the
    protocols of `section` in `sc.environment`, which PySpark passes to the Python workers of every task defined
    meanwhile (clipline's, img2dataset's and autofaiss's); restored afterwards."""
    names = [env_name(p) for p in section if env_name(p) in os.environ]
    saved = {k: sc.environment.get(k) for k in names}
    try:
        for k in names:
            sc.environment[k] = os.environ[k]
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sc.environment.pop(k, None)
            else:
                sc.environment[k] = v


class MaskSecrets(logging.Filter):
    """A handler filter that masks every known secret in a record's message and arguments (exception text too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _SECRETS:
            return True
        message = record.getMessage()
        masked = mask(message)
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = mask(exc_text)
            record.exc_info = None
        if masked != message:
            record.msg, record.args = masked, None
        return True
