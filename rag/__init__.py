"""Retrieval-augmented generation over local documents: ingest, chunk, store, index, retrieve, ask."""
