"""Development tools: an embedded Kafka-protocol broker and a replayer of dataset events."""
