"""The shared kernel: machinery every bounded context uses and none owns.

Settings, Kafka client factories, topic names and admin, the event envelope and its
Kafka headers, the Avro codec, position tokens and telemetry. Nothing here knows a
business domain.
"""
