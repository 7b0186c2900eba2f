"""Small shared helpers (file IO, devices) with no ML logic."""
