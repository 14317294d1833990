"""The Kafka edge of streamer: client interface, kafka-python client, topics, local broker.

LocalBroker lives in ``streamer.kafka.broker`` and is not imported here: it needs the optional
``streamer[local]`` extra only when used.
"""

from streamer.kafka.admin import delete_topics, ensure_topics
from streamer.kafka.client import (
    ConsumerSettings,
    InputRecord,
    OutputRecord,
    PartitionId,
    ProducerSettings,
    StreamClient,
)
from streamer.kafka.connection import KafkaConnection
from streamer.kafka.errors import (
    BrokerUnavailable,
    CommitFailed,
    KafkaClientError,
    UndecodableBatch,
)
from streamer.kafka.kafka_python_client import KafkaPythonClient

__all__ = [
    "BrokerUnavailable",
    "CommitFailed",
    "ConsumerSettings",
    "InputRecord",
    "KafkaClientError",
    "KafkaConnection",
    "KafkaPythonClient",
    "OutputRecord",
    "PartitionId",
    "ProducerSettings",
    "StreamClient",
    "UndecodableBatch",
    "delete_topics",
    "ensure_topics",
]
