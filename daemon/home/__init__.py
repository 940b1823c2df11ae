"""Home Assistant and watches: discovery payloads (discovery.py), the service's side of
dashboards and watch definitions over MQTT (home.py), and standing typed questions per
camera (watches.py)."""
