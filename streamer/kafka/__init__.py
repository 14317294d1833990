"""The Kafka edge of streamer: client interface, its two backends, topics, local broker.

Names are imported when first asked for (PEP 562): the interface modules (``client``,
``connection``, ``errors``) import no Kafka library, so the settings can state the edge's rules
by importing them; kafka-python (or confluent-kafka) is loaded with the client, admin or
producer that needs it.
LocalBroker lives in ``streamer.kafka.broker`` (it needs the optional ``streamer[local]``).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "delete_topics": "admin", "ensure_topics": "admin",
    "ConsumerSettings": "client", "InputRecord": "client", "OutputRecord": "client",
    "PartitionId": "client", "ProducerSettings": "client", "StreamClient": "client",
    "CLIENTS": "client", "open_client": "client",
    "KafkaConnection": "connection",
    "BrokerUnavailable": "errors", "CommitFailed": "errors", "KafkaClientError": "errors",
    "UndecodableBatch": "errors",
    "KafkaPythonClient": "kafka_python_client", "ConfluentClient": "confluent_client",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
