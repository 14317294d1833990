"""Serving: the worker loop and what it owns (partition ledger, batch processing, message
codec, checkpoints); it joins the core (learner) to the Kafka edge."""
