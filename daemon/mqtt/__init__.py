"""MQTT: the interface the service serves on (interface.py), the paho client (client.py,
connection.py) and the embedded broker (broker.py). The only part of vlmd that knows paho."""
