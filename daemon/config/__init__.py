"""vlmd's configuration: the model of it (model.py), where its values come from (sources.py:
the TOML file, `VLMD_` variables, locations of every value), how they are merged and
checked into one `Config` (load.py), its TOML text (toml_text.py) and the board's default
device id (identity.py).

The names callers use are re-exported here; knows nothing of MQTT, the engine or the service.
"""

from daemon.config.load import cli_overrides, ignored_env_names, load_config, redacted_dict
from daemon.config.model import (
    EX_CONFIG,
    BrokerAddress,
    CameraConfig,
    Config,
    MqttConfig,
    RequestsConfig,
    parse_broker_url,
)
from daemon.config.sources import ConfigError

__all__ = [
    "EX_CONFIG", "BrokerAddress", "CameraConfig", "Config", "ConfigError", "MqttConfig", "RequestsConfig",
    "cli_overrides", "ignored_env_names", "load_config", "parse_broker_url", "redacted_dict",
]
