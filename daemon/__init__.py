"""vlmd's service: the core (service, worker, scheduler, inbox, responder, frames), its
interfaces (mqtt/), configuration (config/), request journal (journal/), Home Assistant and
watches (home/), the process loop (lifecycle, systemd, logs) and the commands (commands/)."""
