"""The process main loop of `vlmd serve`: `main(config)` runs a daemon.service.Service.

Main thread only: signal handlers just set an event and wake the loop, which then
stops (SIGTERM/SIGINT), reloads cameras and captions (SIGHUP), publishes stats, and
talks to systemd: EXTEND_TIMEOUT_USEC and STATUS while the model loads, READY once
serving, WATCHDOG only while the worker makes progress (or idles healthily),
STATUS after a reload, STOPPING at shutdown.

READY is sent at the first successful CONNACK, or after `READY_WAIT_S` without one (the
broker may come up later: the client keeps trying, STATUS says it is not connected), so
a broker that is down at boot neither holds the unit in "activating" nor fails it.

Exit codes, as the unit's `RestartPreventExitStatus=78` reads them: 0 after a clean stop;
78 (EX_CONFIG) for what a restart cannot fix: a model that does not load (missing,
unreadable, wrong backend for the machine), topics the config makes unusable, a broker
that refuses our TLS or credentials; 1 for runtime failures (the embedded broker's port
taken, `shutdown.max_consecutive_failures` engine failures in a row), which systemd
restarts. The cause is always logged before "service stopped".
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

from daemon.mqtt.broker import BrokerStartError
from daemon import systemd
from daemon.config import EX_CONFIG, Config, ConfigError
from daemon.logs import get_logger
from daemon.mqtt.connection import MqttError
from daemon.service import EngineFactory, Service, load_engine
from npu.model import ModelError
from protocol.topics import TopicError

log = get_logger("vlmd.service")

MODEL_LOAD_TIMEOUT_S = 300.0
READY_WAIT_S = 30.0  # READY at the first CONNACK, or after this long without one
EX_RUNTIME = 1
STALL_S = 120.0  # no step or token for this long: the worker is stuck, stop pinging the watchdog


def main(config: Config, engine_factory: EngineFactory = load_engine, tick_s: float = 0.5,
         reload_config: Callable[[], Config] | None = None, stall_s: float = STALL_S,
         ready_wait_s: float = READY_WAIT_S) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after `stopped`) or repeated engine failures (exit 1).

    SIGHUP calls `reload_config()` (vlmd serve: the config file and environment again)
    and applies its cameras and captions (`Service.reload`); a config that does not
    load is logged and the running one kept. The watchdog is pinged only while the
    worker has made progress within `stall_s` (an idle worker makes progress: it wakes
    at least every second).
    """
    stop, hangup, wake = threading.Event(), threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        (hangup if signum == signal.SIGHUP else stop).set()
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    notifier = systemd.Notifier()
    watchdog = systemd.Watchdog(notifier)
    service = Service(config, engine_factory)
    try:
        notifier.extend_timeout(MODEL_LOAD_TIMEOUT_S)  # a cold model load can outlast TimeoutStartSec
        notifier.status("loading the model")
        try:
            service.start()
        except (ModelError, TopicError, MqttError, BrokerStartError) as exc:
            return _startup_failure(exc)  # logged here, before `finally` logs "service stopped"
        started, ready = service.clock(), False
        while not stop.is_set() and service.worker_alive and service.fatal_error is None:
            if not ready and (service.client.connected or service.clock() - started >= ready_wait_s):
                ready = True
                notifier.ready(status=_serving_status(service))
            if hangup.is_set():
                hangup.clear()
                notifier.status(_reload(service, reload_config))
            service.tick()
            if ready:
                watchdog.tick(service.worker_alive and _progressing(service, stall_s))
            due = watchdog.seconds_until_due() if ready else None
            wake.wait(tick_s if due is None else max(0.05, min(tick_s, due)))
            wake.clear()
        if service.fatal_error is not None:
            log.error("stopping: the broker connection cannot work with this configuration",
                      reason=service.fatal_error, exit_code=EX_CONFIG)
            return EX_CONFIG
        if not service.healthy:
            log.error("stopping after repeated engine failures", limit=config.shutdown.max_consecutive_failures,
                      exit_code=EX_RUNTIME)
            return EX_RUNTIME
        notifier.stopping(status="stopping: finishing the running answer")
        return 0
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _startup_failure(exc: Exception) -> int:
    """Log why the daemon cannot start (one line) and choose the exit code."""
    if isinstance(exc, BrokerStartError):  # e.g. the port is taken: may be free after a restart
        log.error("cannot start the embedded broker", error=str(exc), exit_code=EX_RUNTIME)
        return EX_RUNTIME
    what = "cannot load the model" if isinstance(exc, ModelError) else "invalid configuration"
    log.error(what, error=str(exc), exit_code=EX_CONFIG)
    return EX_CONFIG


def _serving_status(service: Service) -> str:
    where = f"serving on {service.broker_url} as {service.topics.root}"
    return where if service.client.connected else f"{where}; broker not connected yet (retrying)"


def _reload(service: Service, reload_config: Callable[[], Config] | None) -> str:
    """SIGHUP: the new config's cameras, or the old ones kept; the STATUS line to show."""

    if reload_config is None:
        log.warning("SIGHUP ignored: this daemon was not started from a config it can read again")
        return "reload not available"
    try:
        return service.reload(reload_config())
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("reload refused: invalid configuration", problem=str(issue))
        return f"reload failed ({len(exc.issues)} config problem(s)); running config kept"
    except TopicError as exc:
        log.error("reload refused", problem=str(exc))
        return "reload failed (camera topics); running config kept"
    except Exception:  # a reload must never take the running daemon down
        log.exception("reload failed")
        return "reload failed; running config kept"


def _progressing(service: Service, stall_s: float = STALL_S) -> bool:
    """The worker made progress recently (a step or a token): a hung NPU call is not."""
    worker = service.worker
    return worker is not None and service.clock() - worker.last_progress < stall_s
