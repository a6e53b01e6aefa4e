"""Streaming worker: applies one recurrent step per user event and publishes top-K recommendations."""
