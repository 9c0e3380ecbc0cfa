"""Durable storage: the replicated raw log (segments) and the Parquet warehouse."""
