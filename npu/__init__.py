"""vlmd's model runtime: sessions, KV cache, vision, decoder, sampling, tokenizer.

Knows nothing of MQTT, config files or the daemon.
"""
