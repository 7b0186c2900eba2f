"""Alignment checks between the rollout engine and the trainer (`miles align-check`)."""
