"""streamer: online per-sensor stateful LSTM forecasting over Kafka."""

__version__ = "0.1.0"
