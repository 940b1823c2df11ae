"""vlmd's wire contract: topics, payload models, frame decoding, codec.

Knows nothing of paho or of the model runtime.
"""
