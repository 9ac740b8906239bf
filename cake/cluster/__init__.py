"""Spreading a model's layers over several machines."""
