"""Evaluation commands: `python -m eval.rfid`."""
