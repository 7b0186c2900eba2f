"""Native model definitions shared by the rollout engine and the trainer (single device)."""
