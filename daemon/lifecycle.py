"""The process main loop of `vlmd serve` (`daemon.service.main` calls `run`).

Main thread only: signal handlers just set an event and wake the loop, which then
stops (SIGTERM/SIGINT), reloads cameras and captions (SIGHUP), publishes stats, and
talks to systemd: EXTEND_TIMEOUT_USEC and STATUS while the model loads, READY once
serving, WATCHDOG only while the worker makes progress (or idles healthily),
STATUS after a reload, STOPPING at shutdown. Exit code: 0 after a clean stop, 1 after
`shutdown.max_consecutive_failures` engine failures in a row (systemd restarts it).
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

from daemon.config import Config
from daemon.logs import get_logger
from daemon.service import EngineFactory, Service, load_engine
from protocol.topics import TopicError

log = get_logger("vlmd.service")

MODEL_LOAD_TIMEOUT_S = 300.0
STALL_S = 120.0  # no step or token for this long: the worker is stuck, stop pinging the watchdog


def run(config: Config, engine_factory: EngineFactory = load_engine, tick_s: float = 0.5,
         reload_config: Callable[[], Config] | None = None, stall_s: float = STALL_S) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after `stopped`) or repeated engine failures (exit 1).

    SIGHUP calls `reload_config()` (vlmd serve: the config file and environment again)
    and applies its cameras and captions (`Service.reload`); a config that does not
    load is logged and the running one kept. The watchdog is pinged only while the
    worker has made progress within `stall_s` (an idle worker makes progress: it wakes
    at least every second).
    """
    from daemon import systemd

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
        service.start()
        notifier.ready(status=f"serving on {service.broker_url} as {service.topics.root}")
        while not stop.is_set() and service.worker_alive:
            if hangup.is_set():
                hangup.clear()
                notifier.status(_reload(service, reload_config))
            service.tick()
            watchdog.tick(service.worker_alive and _progressing(service, stall_s))
            due = watchdog.seconds_until_due()
            wake.wait(tick_s if due is None else max(0.05, min(tick_s, due)))
            wake.clear()
        notifier.stopping(status="stopping: finishing the running answer")
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not service.healthy:
        log.error("stopping after repeated engine failures", limit=config.shutdown.max_consecutive_failures)
        return 1
    return 0


def _reload(service: Service, reload_config: Callable[[], Config] | None) -> str:
    """SIGHUP: the new config's cameras, or the old ones kept; the STATUS line to show."""
    from daemon.config import ConfigError

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
