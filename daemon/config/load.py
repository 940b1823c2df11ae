"""Loading the config: one TOML file + `VLMD_` environment variables + CLI overrides.

Contract:
- `load_config(path, env, overrides) -> Config`; precedence defaults < file < env <
  overrides. The environment is read only inside `load_config` (never at import).
- Env names: `VLMD_<KEY>` with `__` for nesting, e.g. `VLMD_MQTT__BROKER`,
  `VLMD_DEVICE_ID`, `VLMD_CAMERAS__FRONT__CAPTION=true`. Keys are lower-cased. Variables
  whose first part is not a top-level config key (e.g. `VLMD_BOARD_MODEL_DIR`) are
  not config and are ignored (`ignored_env_names` lists them).
- Every problem is collected and raised once as `ConfigError(issues)`; each issue is a
  `(location, message)` pair whose location names the source (`file:line`, `env NAME`
  or `override`) and the key path.
- Relative paths in the file are relative to the file's directory. `password_file`
  may use `${CREDENTIALS_DIRECTORY}`; with neither password nor password_file set,
  `$CREDENTIALS_DIRECTORY/mqtt_password` is used when it exists (systemd
  LoadCredential=). The password is read at load time and kept as a `SecretStr`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr, ValidationError

from daemon.config.model import CREDENTIAL_NAME, Config, MqttConfig
from daemon.config.sources import (
    ENV_PREFIX,
    ConfigError,
    ConfigIssue,
    Key,
    deep_merge,
    env_key,
    env_layer,
    error_key,
    file_layer,
    issue_from_pydantic,
    leaves,
    located,
    set_key,
)

_PATH_KEYS: set[Key] = {("model", "path"), ("mqtt", "password_file"), ("journal", "directory"),
                        *(("mqtt", "tls", k) for k in ("ca_file", "cert_file", "key_file"))}


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None, overrides: dict | None = None) -> Config:
    """Build the effective Config; raises ConfigError listing every problem found."""
    env = os.environ if env is None else env
    layers: list[tuple[dict, dict[Key, str]]] = []
    if path is not None:
        layers.append(file_layer(Path(path), _PATH_KEYS))
    env_data, env_sources, env_issues = env_layer(env, Config)
    layers.append((env_data, env_sources))
    issues = list(env_issues.values())
    if overrides:
        layers.append((overrides, {key: "override" for key, _ in leaves(overrides)}))
    merged: dict = {}
    provenance: dict[Key, str] = {}
    for data, sources in layers:
        deep_merge(merged, data)
        provenance.update(sources)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        issues += [issue_from_pydantic(err, provenance) for err in exc.errors() if error_key(err) not in env_issues]
    if issues:
        raise ConfigError(issues)
    return _resolve_files(config, env, provenance)


def cli_overrides(broker: str | None = None, device_id: str | None = None, model: str | Path | None = None,
                  precision: str | None = None, log_level: str | None = None) -> dict:
    """The `overrides` dict for load_config from the common command-line flags (None = not given)."""
    flags = {("mqtt", "broker"): broker, ("device_id",): device_id, ("model", "path"): model,
             ("model", "precision"): precision, ("logging", "level"): log_level}
    overrides: dict = {}
    for key, value in flags.items():
        if value is not None:
            set_key(overrides, key, str(value) if isinstance(value, Path) else value)
    return overrides


def redacted_dict(config: Config) -> dict:
    """The config as plain TOML-able values with every secret replaced by "<redacted>"."""
    data = config.model_dump(mode="json")
    data["mqtt"]["password"] = "<redacted>" if config.mqtt.password_value() else ""
    return data


def ignored_env_names(env: Mapping[str, str]) -> list[str]:
    """`VLMD_*` variables that are not config keys (left alone by load_config)."""
    return sorted(name for name in env if name.startswith(ENV_PREFIX) and env_key(name, Config.model_fields) is None)


def _resolve_files(config: Config, env: Mapping[str, str], provenance: dict[Key, str]) -> Config:
    """Check that named files exist and read the password file (at load, not import)."""
    issues: list[ConfigIssue] = []
    mqtt = config.mqtt
    password_file = _password_file(mqtt, env)
    password = mqtt.password
    if isinstance(password_file, str):  # a problem, not a path
        issues.append(located(("mqtt", "password_file"), provenance, password_file))
    elif password_file is not None:
        try:
            password = SecretStr(password_file.read_text(encoding="utf-8").rstrip("\r\n"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            issues.append(located(("mqtt", "password_file"), provenance, f"cannot read the password file {password_file}: {reason}"))
    for name in ("ca_file", "cert_file", "key_file"):
        file = getattr(mqtt.tls, name)
        if file is not None and not file.is_file():
            issues.append(located(("mqtt", "tls", name), provenance, f"no such file: {file}"))
    if config.model.path is not None and not config.model.path.exists():
        issues.append(located(("model", "path"), provenance, f"no such model directory or file: {config.model.path}"))
    if issues:
        raise ConfigError(issues)
    new_mqtt = mqtt.model_copy(update={"password": password, "password_file": password_file})
    return config.model_copy(update={"mqtt": new_mqtt})


def _password_file(mqtt: MqttConfig, env: Mapping[str, str]) -> Path | str | None:
    """The password file to read (None: none), or a message saying why it cannot be."""
    credentials = env.get("CREDENTIALS_DIRECTORY", "")
    if mqtt.password_file is None:
        found = Path(credentials) / CREDENTIAL_NAME if credentials else None
        usable = found is not None and not mqtt.password_value() and found.is_file()
        return found if usable else None  # systemd's LoadCredential=mqtt_password
    text = str(mqtt.password_file)
    if "CREDENTIALS_DIRECTORY" in text and not credentials:
        return "password_file uses $CREDENTIALS_DIRECTORY, which only systemd sets (LoadCredential=)"
    return Path(text.replace("${CREDENTIALS_DIRECTORY}", credentials).replace("$CREDENTIALS_DIRECTORY", credentials))
