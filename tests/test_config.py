"""Config loading: defaults, TOML file, VLMD_ environment, overrides, errors with locations,
secrets, and the `vlmd check-config` command."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from daemon.cli import main as vlmd_main
from daemon.config import (
    EX_CONFIG,
    BrokerAddress,
    Config,
    ConfigError,
    cli_overrides,
    ignored_env_names,
    load_config,
    parse_broker_url,
    redacted_dict,
)
from daemon.config.toml_text import dump_toml, toml_key_lines

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "vlmd.toml"
SECRET = "hunter2-do-not-print"


def write(tmp_path: Path, text: str, name: str = "vlmd.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def issues_of(excinfo) -> list[str]:
    return [str(issue) for issue in excinfo.value.issues]


# --- defaults and the model ----------------------------------------------------------


def test_defaults_fill_device_id_root_and_client_id(monkeypatch, tmp_path):
    import daemon.config.identity as identity

    monkeypatch.setattr(identity.socket, "gethostname", lambda: "M5Stack LLM/630")
    monkeypatch.setattr(identity, "SYS_CLASS_NET", tmp_path / "no-interfaces")
    config = Config()
    assert config.device_id == "M5Stack-LLM-630"  # no MAC to read: the host name alone
    assert config.root == "vlmd/M5Stack-LLM-630"
    assert config.mqtt.client_id == "vlmd-M5Stack-LLM-630"
    assert Config().device_id == identity.default_device_id()
    assert config.mqtt.broker_address is None  # embedded broker
    assert config.model.path is None  # demo model
    assert config.mqtt.password_value() is None


def test_explicit_ids_are_kept():
    config = Config(device_id="board1", root="home/vision", mqtt={"client_id": "me"})
    assert (config.device_id, config.root, config.mqtt.client_id) == ("board1", "home/vision", "me")


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from _models(candidate)


def test_every_field_has_a_description_and_extra_is_forbidden():
    for model in _models(Config):
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_config_is_frozen():
    with pytest.raises(ValueError):
        Config().device_id = "x"


# --- file, environment, overrides ------------------------------------------------------


def test_precedence_defaults_file_env_overrides(tmp_path):
    path = write(tmp_path, """
        device_id = "from-file"
        [mqtt]
        broker = "mqtt://file:1883"
        keepalive_s = 40
        [requests]
        queue_size = 3
    """)
    env = {"VLMD_MQTT__BROKER": "mqtts://env:8884", "VLMD_DEVICE_ID": "from-env", "VLMD_REQUESTS__QUEUE_SIZE": "5"}
    config = load_config(path, env, overrides={"device_id": "from-flag"})
    assert config.device_id == "from-flag"
    assert config.mqtt.broker_address == BrokerAddress("env", 8884, True)
    assert config.mqtt.keepalive_s == 40  # file, untouched by env
    assert config.requests.queue_size == 5
    assert config.frames.history == 4  # default


def test_env_nesting_parsing_and_cameras():
    env = {
        "VLMD_CAMERAS__FRONT__CAPTION": "true",
        "VLMD_CAMERAS__FRONT__INTERVAL_S": "12.5",
        "VLMD_CAMERAS__FRONT__MAX_TOKENS": "+40",
        "VLMD_MQTT__PERSISTENT_SESSION": "false",
        "VLMD_MQTT__RECONNECT_MAX_S": "90",  # an integer is a float
        "VLMD_LOGGING__LEVEL": "debug",
        "VLMD_MODEL__PATH": "",  # empty: the demo model
    }
    config = load_config(None, env)
    assert config.cameras["front"].caption is True
    assert config.cameras["front"].interval_s == 12.5
    assert config.cameras["front"].max_tokens == 40
    assert config.mqtt.persistent_session is False
    assert config.mqtt.reconnect_max_s == 90.0
    assert config.logging.level == "debug"
    assert config.model.path is None


def test_file_values_are_never_coerced(tmp_path):
    """A string is no integer, float or bool in the file (the README says "validated strictly")."""
    path = write(tmp_path, """
        [mqtt]
        keepalive_s = "30"
        persistent_session = 1

        [cameras.front]
        caption = "yes"
        interval_s = "5"
        max_tokens = 12.0
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    messages = issues_of(excinfo)
    assert len(messages) == 5, messages
    for line, key in ((2, "mqtt.keepalive_s"), (3, "mqtt.persistent_session"), (6, "cameras.front.caption"),
                      (7, "cameras.front.interval_s"), (8, "cameras.front.max_tokens")):
        assert any(m.startswith(f"{path}:{line} {key}:") for m in messages), (key, messages)
    good = write(tmp_path, "[cameras.front]\ninterval_s = 5\n", "good.toml")  # TOML's integer for a float field
    assert load_config(good, {}).cameras["front"].interval_s == 5.0


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("VLMD_CAMERAS__FRONT__CAPTION", "yes", "expected true or false, got 'yes'"),
    ("VLMD_CAMERAS__FRONT__CAPTION", "1", "expected true or false, got '1'"),
    ("VLMD_CAMERAS__FRONT__CAPTION", "True", "expected true or false, got 'True'"),
    ("VLMD_MQTT__KEEPALIVE_S", "30.0", "expected an integer, got '30.0'"),
    ("VLMD_MQTT__KEEPALIVE_S", " 30", "expected an integer, got ' 30'"),
    ("VLMD_CAMERAS__FRONT__INTERVAL_S", "5s", "expected a number, got '5s'"),
    ("VLMD_MODEL__DEVICE", "", "expected an integer, got ''"),
])
def test_env_values_are_parsed_by_field_type(name, value, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {name: value})
    key = ".".join(part.lower() for part in name.removeprefix("VLMD_").split("__"))
    assert issues_of(excinfo) == [f"env {name} {key}: {expected}"]


def test_every_env_and_file_error_at_once_bad_camera_name_included(tmp_path):
    path = write(tmp_path, """
        [mqtt]
        keepalive_s = 2

        [cameras."a+b"]
        caption = true

        [cameras.ok]
        interval_s = -1
    """)
    env = {"VLMD_CAMERAS__C+D__CAPTION": "yes", "VLMD_FRAMES__HISTORY": "many"}
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env)
    messages = issues_of(excinfo)
    assert len(messages) == 6, messages
    assert any(m.startswith(f"{path}:2 mqtt.keepalive_s:") for m in messages)
    assert any(m.startswith(f"{path}:5 cameras.a+b:") and "invalid camera name" in m for m in messages)
    assert any(m.startswith(f"{path}:8 cameras.ok.interval_s:") for m in messages)
    assert "env VLMD_CAMERAS__C+D__CAPTION cameras.c+d.caption: expected true or false, got 'yes'" in messages
    assert any(m.startswith("env VLMD_CAMERAS__C+D__CAPTION cameras.c+d:") and "invalid camera name" in m for m in messages)
    assert "env VLMD_FRAMES__HISTORY frames.history: expected an integer, got 'many'" in messages


def test_unrelated_vlmd_variables_are_ignored_and_listed():
    env = {"VLMD_BOARD_MODEL_DIR": "/x", "VLMD_DEVICE_ID": "b", "PATH": "/bin"}
    assert load_config(None, env).device_id == "b"
    assert ignored_env_names(env) == ["VLMD_BOARD_MODEL_DIR"]


def test_environment_is_read_at_call_time_only(monkeypatch):
    monkeypatch.setenv("VLMD_DEVICE_ID", "late")
    assert load_config(None).device_id == "late"  # env=None: os.environ now
    assert load_config(None, env={}).device_id != "late"  # an explicit env replaces it


def test_cli_overrides_builds_nested_dict():
    assert cli_overrides() == {}
    overrides = cli_overrides(broker="mqtt://b:1", device_id="d", model=Path("/m"), precision="fp32")
    assert overrides == {"mqtt": {"broker": "mqtt://b:1"}, "device_id": "d", "model": {"path": "/m", "precision": "fp32"}}


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "ca.pem").write_text("pem")
    path = write(tmp_path, """
        [model]
        path = "models/m"
        [mqtt]
        broker = "mqtts://b"
        [mqtt.tls]
        ca_file = "ca.pem"
    """)
    config = load_config(path, {})
    assert config.model.path == tmp_path / "models" / "m"
    assert config.mqtt.tls.ca_file == tmp_path / "ca.pem"


# --- errors and their locations ----------------------------------------------------


def test_every_error_is_reported_with_file_line_and_key(tmp_path):
    path = write(tmp_path, """
        device_id = "ok"

        [mqtt]
        keepalive_s = 2
        protocol = "4"

        [cameras.front]
        caption = true
        intervall_s = 5
        [frames]
        history = 0
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    messages = issues_of(excinfo)
    assert len(messages) == 4
    assert any(m.startswith(f"{path}:4 mqtt.keepalive_s:") and "greater than or equal to 5" in m for m in messages)
    assert any(m.startswith(f"{path}:5 mqtt.protocol:") for m in messages)
    assert f"{path}:9 cameras.front.intervall_s: unknown key" in messages
    assert any(m.startswith(f"{path}:11 frames.history:") for m in messages)


def test_env_and_override_errors_name_their_source():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"VLMD_MQTT__KEEPALIVE_S": "soon", "VLMD_MQTT__BROKR": "x"}, overrides={"mqtt": {"broker": "http://h"}})
    messages = issues_of(excinfo)
    assert any(m.startswith("env VLMD_MQTT__KEEPALIVE_S mqtt.keepalive_s:") and "'soon'" in m for m in messages)
    assert "env VLMD_MQTT__BROKR mqtt.brokr: unknown key" in messages
    assert any(m.startswith("override mqtt.broker:") and "mqtt://" in m for m in messages)


def test_cross_field_error_points_at_the_section(tmp_path):
    path = write(tmp_path, """
        [requests]
        default_max_tokens = 2000
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    assert issues_of(excinfo) == [f"{path}:2 requests: default_max_tokens must be <= max_tokens_limit"]


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, 'device_id = "a"\n[mqtt\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    (message,) = issues_of(excinfo)
    assert message.startswith(f"{path}: not valid TOML") and "line 2" in message


def test_the_board_data_path_is_a_switch():
    assert load_config(None, {}).model.data_path == "auto"
    for value in ("zero-copy", "public"):
        assert load_config(None, {"VLMD_MODEL__DATA_PATH": value}).model.data_path == value


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml", {})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.lan", BrokerAddress("broker.lan", 1883, False)),
        ("mqtts://broker.lan", BrokerAddress("broker.lan", 8883, True)),
        ("mqtt://10.0.0.2:1884", BrokerAddress("10.0.0.2", 1884, False)),
        ("mqtt://[::1]:1883", BrokerAddress("::1", 1883, False)),
    ],
)
def test_broker_urls(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("tcp://h:1883", "mqtt:// or mqtts://"),
        ("mqtt://user:pw@h", "credentials"),
        ("mqtt://h:99999", "bad port"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h/topic", "only a host and a port"),
    ],
)
def test_bad_broker_urls(url, why):
    with pytest.raises(ValueError, match=why):
        parse_broker_url(url)
    with pytest.raises(ConfigError, match=why):
        load_config(None, {"VLMD_MQTT__BROKER": url})


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"VLMD_DEVICE_ID": "a/b"}, "device_id must be"),
        ({"VLMD_ROOT": "vlmd/+/x"}, "wildcards"),
        ({"VLMD_ROOT": "vlmd/"}, "must not start or end"),
        ({"VLMD_CAMERAS__A+B__CAPTION": "true"}, "invalid camera name"),
        ({"VLMD_CAMERAS__FRONT__TOPIC": "frigate/+/snapshot"}, "wildcards"),
        ({"VLMD_FLEET__GROUP": "a/b"}, "one topic level"),
        ({"VLMD_MQTT__RECONNECT_MIN_S": "10", "VLMD_MQTT__RECONNECT_MAX_S": "5"}, "reconnect_max_s"),
        ({"VLMD_MQTT__TLS__INSECURE": "true"}, "mqtts://"),
        ({"VLMD_MODEL__BACKEND": "onnx"}, "model.backend"),
        ({"VLMD_MODEL__DATA_PATH": "fast"}, "model.data_path"),
        ({"VLMD_STATS__INTERVAL_S": "nan"}, "stats.interval_s"),
    ],
)
def test_invalid_values(env, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("+", r"\+")):
        load_config(None, env)


def test_named_files_must_exist(tmp_path):
    env = {"VLMD_MODEL__PATH": str(tmp_path / "no-model"), "VLMD_MQTT__BROKER": "mqtts://b", "VLMD_MQTT__TLS__CA_FILE": str(tmp_path / "ca.pem")}
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env)
    messages = issues_of(excinfo)
    assert any(m.startswith("env VLMD_MODEL__PATH model.path: no such model directory") for m in messages)
    assert any(m.startswith("env VLMD_MQTT__TLS__CA_FILE mqtt.tls.ca_file: no such file") for m in messages)


# --- secrets ----------------------------------------------------------------------------


def test_password_never_printed(tmp_path):
    path = write(tmp_path, f"""
        [mqtt]
        password = "{SECRET}"
        keepalive_s = "x"
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    assert SECRET not in str(excinfo.value)
    config = load_config(path, {"VLMD_MQTT__KEEPALIVE_S": "30"})
    assert config.mqtt.password_value() == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert SECRET not in dump_toml(redacted_dict(config))
    assert redacted_dict(config)["mqtt"]["password"] == "<redacted>"


def test_bad_password_type_error_does_not_echo_it():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {}, overrides={"mqtt": {"password": ["not", SECRET]}})
    assert SECRET not in str(excinfo.value)
    assert "mqtt.password" in str(excinfo.value)


def test_password_file_is_read_and_stripped(tmp_path):
    (tmp_path / "pw").write_text(SECRET + "\n")
    config = load_config(None, {"VLMD_MQTT__PASSWORD_FILE": str(tmp_path / "pw")})
    assert config.mqtt.password_value() == SECRET


def test_password_file_expands_credentials_directory(tmp_path):
    (tmp_path / "mqtt_password").write_text(SECRET)
    path = write(tmp_path, """
        [mqtt]
        password_file = "${CREDENTIALS_DIRECTORY}/mqtt_password"
    """)
    config = load_config(path, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.mqtt.password_value() == SECRET
    assert config.mqtt.password_file == tmp_path / "mqtt_password"


def test_systemd_credential_is_found_without_config(tmp_path):
    (tmp_path / "mqtt_password").write_text(SECRET + "\n")
    assert load_config(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).mqtt.password_value() == SECRET
    (tmp_path / "mqtt_password").write_text("")  # an empty credential = anonymous
    assert load_config(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).mqtt.password_value() is None


def test_missing_password_file_and_both_kinds_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="mqtt.password_file: cannot read the password file"):
        load_config(None, {"VLMD_MQTT__PASSWORD_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, {"VLMD_MQTT__PASSWORD": "a", "VLMD_MQTT__PASSWORD_FILE": str(tmp_path / "nope")})


# --- the example config and the effective-config dump --------------------------------


def test_example_config_is_valid_and_documents_every_section():
    config = load_config(EXAMPLE, {})
    assert config.cameras["front_door"].caption is True
    sections = {key[0] for key in toml_key_lines(EXAMPLE.read_text())}
    assert set(Config.model_fields) <= sections


def test_effective_config_round_trips(tmp_path):
    config = load_config(EXAMPLE, {}, overrides={"device_id": "b1"})
    dumped = dump_toml(redacted_dict(config))
    again = load_config(write(tmp_path, dumped, "effective.toml"), {})
    assert again == config


_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)))  # TOML strings hold Unicode scalar values
_scalars = st.one_of(st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), _text)
_names = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
_tables = st.recursive(st.dictionaries(_names, _scalars, max_size=4), lambda inner: st.dictionaries(_names, st.one_of(_scalars, inner), max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(_tables)
def test_dump_toml_round_trips(data):
    assert tomllib.loads(dump_toml(data)) == data


def test_key_lines_follow_tables_dotted_keys_and_multiline_strings():
    text = textwrap.dedent('''
        a = 1
        [mqtt]  # comment
        broker = "x"
        tls.ca_file = "y"
        note = """
        fake = 1
        """
        [cameras."front door"]
        caption = true
    ''').lstrip()
    lines = toml_key_lines(text)
    assert lines[("a",)] == 1
    assert lines[("mqtt", "broker")] == 3
    assert lines[("mqtt", "tls", "ca_file")] == 4
    assert ("mqtt", "fake") not in lines
    assert lines[("cameras", "front door", "caption")] == 9


# --- `vlmd check-config` ----------------------------------------------------------------


def test_check_config_valid_prints_effective_config(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMD_BOARD_MODEL_DIR", "/x")
    monkeypatch.setenv("VLMD_MQTT__PASSWORD", SECRET)
    assert vlmd_main(["check-config", str(EXAMPLE), "--device-id", "cli-id"]) == 0
    out, err = capsys.readouterr()
    effective = tomllib.loads(out)
    assert effective["device_id"] == "cli-id"
    assert effective["mqtt"]["password"] == "<redacted>"
    assert SECRET not in out + err
    assert "VLMD_BOARD_MODEL_DIR" in err


def test_check_config_errors_exit_78(capsys, tmp_path):
    path = write(tmp_path, """
        [mqtt]
        keepalive_s = 1
        colour = "blue"
    """)
    assert vlmd_main(["check-config", str(path)]) == EX_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert f"error: {path}:2 mqtt.keepalive_s:" in err
    assert f"error: {path}:3 mqtt.colour: unknown key" in err
    assert "2 errors" in err


def test_credentials_directory_outside_systemd_is_explained(tmp_path):
    path = write(tmp_path, """
        [mqtt]
        password_file = "${CREDENTIALS_DIRECTORY}/mqtt_password"
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    assert issues_of(excinfo) == [f"{path}:2 mqtt.password_file: password_file uses $CREDENTIALS_DIRECTORY, which only systemd sets (LoadCredential=)"]


def test_check_config_without_file_uses_defaults_and_env(capsys, monkeypatch):
    monkeypatch.setenv("VLMD_DEVICE_ID", "env-board")
    assert vlmd_main(["check-config", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert vlmd_main(["check-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["root"] == "vlmd/env-board"


def test_check_config_missing_file_exits_78(capsys, tmp_path):
    assert vlmd_main(["check-config", str(tmp_path / "absent.toml")]) == EX_CONFIG
    assert "cannot read the config file" in capsys.readouterr().err


def test_every_path_field_takes_text():
    """Strict models refuse str for Path unless the field says so; TOML and the environment
    only have text, so every Path field must take it (a new one forgetting strict=False fails here)."""
    import typing
    from pathlib import Path as _Path

    from pydantic import BaseModel as _Model

    def path_fields(model: type[_Model], prefix: str = ""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            members = typing.get_args(annotation) or (annotation,)
            if _Path in members:
                yield f"{prefix}{name}", field
            for member in members:
                if isinstance(member, type) and issubclass(member, _Model):
                    yield from path_fields(member, f"{prefix}{name}.")

    fields = dict(path_fields(Config))
    assert {"model.path", "mqtt.password_file", "mqtt.tls.ca_file"} <= set(fields)
    lax = {name for name, field in fields.items() if any(getattr(m, "strict", None) is False for m in field.metadata)}
    assert set(fields) - lax == set()
